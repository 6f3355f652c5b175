//! Messages larger than the NATS server takes in one (its `max_payload`, 1 MiB by default),
//! sent in parts: every part but the last is published with a `Pagemesh-Part: i/n` header,
//! the last (with the request's reply subject) carries `n-1/n`, and the receiver's
//! [`Assembler`] puts them together. A message that fits goes whole, without the header. NATS
//! keeps the order of one connection's messages to one subscriber, so the parts arrive in
//! order.

use async_nats::HeaderMap;

/// The header naming a part.
pub const PART_HEADER: &str = "Pagemesh-Part";
/// Room left in each part for the header and the protocol line.
const HEADER_ROOM: usize = 1024;
/// Most parts in one message.
pub const MAX_PARTS: usize = 4096;

/// One part of a message.
#[derive(Debug, Default)]
pub struct Part {
    /// Its headers (empty for a message sent whole).
    pub headers: HeaderMap,
    /// Its bytes.
    pub payload: Vec<u8>,
}

/// `payload` cut into parts that each fit in `max_payload` bytes (never fewer than one part).
pub fn split(payload: Vec<u8>, max_payload: usize) -> Vec<Part> {
    if payload.len() <= max_payload.saturating_sub(HEADER_ROOM).max(1) || max_payload == 0 {
        return vec![Part { headers: HeaderMap::new(), payload }];
    }
    let size = max_payload.saturating_sub(HEADER_ROOM).max(1);
    let total = payload.len().div_ceil(size);
    payload
        .chunks(size)
        .enumerate()
        .map(|(index, chunk)| {
            let mut headers = HeaderMap::new();
            headers.insert(PART_HEADER, format!("{index}/{total}").as_str());
            Part { headers, payload: chunk.to_vec() }
        })
        .collect()
}

/// What a received message amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// A whole message.
    Complete(Vec<u8>),
    /// A part; more are to come.
    Partial,
    /// A part out of order or over the size limit (what was gathered is dropped).
    Refused(String),
}

/// Puts parts back together, one message at a time, up to a size limit.
#[derive(Debug)]
pub struct Assembler {
    max_bytes: usize,
    /// The parts gathered so far: (parts expected, next index, bytes).
    pending: Option<(usize, usize, Vec<u8>)>,
}

impl Assembler {
    /// An assembler of messages up to `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes, pending: None }
    }

    /// Takes one received message (its headers and payload).
    pub fn accept(&mut self, headers: Option<&HeaderMap>, payload: &[u8]) -> Assembled {
        let Some(part) = headers.and_then(|h| h.get(PART_HEADER)) else {
            self.pending = None;
            return self.whole(payload.to_vec());
        };
        let Some((index, total)) = parse_part(part.as_str()) else {
            self.pending = None;
            return Assembled::Refused(format!("malformed {PART_HEADER} header `{}`", part.as_str()));
        };
        let (expected, next, mut bytes) = match self.pending.take() {
            _ if index == 0 => (total, 0, Vec::new()),
            Some(pending) => pending,
            None => return Assembled::Refused(format!("part {index}/{total} came without its first part")),
        };
        if expected != total || next != index {
            return Assembled::Refused(format!("part {index}/{total} came out of order"));
        }
        if bytes.len() + payload.len() > self.max_bytes {
            return Assembled::Refused(format!("the message exceeds {} bytes", self.max_bytes));
        }
        bytes.extend_from_slice(payload);
        if index + 1 == total {
            return self.whole(bytes);
        }
        self.pending = Some((total, index + 1, bytes));
        Assembled::Partial
    }

    fn whole(&self, bytes: Vec<u8>) -> Assembled {
        if bytes.len() > self.max_bytes {
            return Assembled::Refused(format!("the message exceeds {} bytes", self.max_bytes));
        }
        Assembled::Complete(bytes)
    }
}

/// `i/n` with `i < n`, `2 <= n <= MAX_PARTS`.
fn parse_part(value: &str) -> Option<(usize, usize)> {
    let (index, total) = value.split_once('/')?;
    let (index, total) = (index.trim().parse::<usize>().ok()?, total.trim().parse::<usize>().ok()?);
    (index < total && (2..=MAX_PARTS).contains(&total)).then_some((index, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(parts: &[Part], assembler: &mut Assembler) -> Vec<Assembled> {
        parts.iter().map(|p| assembler.accept(Some(&p.headers), &p.payload)).collect()
    }

    #[test]
    fn a_message_that_fits_goes_whole_and_a_larger_one_in_parts_that_fit() {
        let small = split(vec![7; 100], 4096);
        assert_eq!(small.len(), 1);
        assert!(small[0].headers.get(PART_HEADER).is_none());
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let parts = split(payload.clone(), 2048);
        assert_eq!(parts.len(), 10);
        assert!(parts.iter().all(|p| p.payload.len() <= 2048 - HEADER_ROOM));
        let mut assembler = Assembler::new(1 << 20);
        let results = assemble(&parts, &mut assembler);
        assert!(results[..9].iter().all(|r| *r == Assembled::Partial));
        assert_eq!(results[9], Assembled::Complete(payload));
    }

    #[test]
    fn parts_out_of_order_missing_or_over_the_limit_are_refused() {
        let parts = split(vec![1; 5000], 2048);
        let mut assembler = Assembler::new(1 << 20);
        assert!(matches!(assembler.accept(Some(&parts[1].headers), &parts[1].payload), Assembled::Refused(_)));
        assembler.accept(Some(&parts[0].headers), &parts[0].payload);
        assert!(matches!(assembler.accept(Some(&parts[2].headers), &parts[2].payload), Assembled::Refused(_)));
        let mut small = Assembler::new(3000);
        let results = assemble(&parts, &mut small);
        assert!(matches!(results[2], Assembled::Refused(_)) || matches!(results[1], Assembled::Refused(_)));
        for bad in ["", "1", "2/1", "0/1", "0/99999", "a/b", "-1/3"] {
            let mut headers = HeaderMap::new();
            headers.insert(PART_HEADER, bad);
            assert!(matches!(Assembler::new(10).accept(Some(&headers), b"x"), Assembled::Refused(_)), "{bad:?}");
        }
        // A whole message after a started one replaces it.
        let mut assembler = Assembler::new(1 << 20);
        assembler.accept(Some(&parts[0].headers), &parts[0].payload);
        assert_eq!(assembler.accept(None, b"whole"), Assembled::Complete(b"whole".to_vec()));
        assert!(matches!(assembler.accept(Some(&parts[1].headers), &parts[1].payload), Assembled::Refused(_)));
    }
}
