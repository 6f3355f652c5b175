//! What keeps the HTTP side standing under hostile clients: a file-descriptor budget and a
//! connection limit below it, bounded header and body reading, and detection of a client that
//! went away while its (non-streamed) answer is being made.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use actix_web::HttpRequest;

/// File descriptors kept out of the HTTP connection budget (NATS, logs, model files, …).
const RESERVED_FDS: u64 = 512;
/// How often a waiting handler checks whether its client is still there.
pub const PEER_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Raises this process's soft limit on open files to its hard limit and returns the limit.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        // `rlim_t` is not u64 everywhere.
        #[allow(clippy::unnecessary_cast)]
        let current = limit.rlim_cur as u64;
        current
    }
}

/// Connections each HTTP worker may hold so that all of them together stay within the file
/// descriptor limit, with room left for everything else (an accepted connection beyond the
/// limit waits in the listen backlog instead of failing the process's other work).
pub fn connections_per_worker(fd_limit: u64, workers: usize) -> usize {
    let budget = fd_limit.saturating_sub(RESERVED_FDS).max(64);
    // A non-streamed request in flight holds a second descriptor (its peer check).
    (budget / 2 / workers.max(1) as u64).max(16) as usize
}

/// The socket of an HTTP connection, recorded when it is accepted.
#[derive(Debug, Clone, Copy)]
pub struct PeerSocket(RawFd);

/// `HttpServer::on_connect` hook: records each connection's socket.
pub fn record_socket(connection: &dyn std::any::Any, data: &mut actix_web::dev::Extensions) {
    if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        data.insert(PeerSocket(tcp.as_raw_fd()));
    }
}

/// Watches whether the client of a request is still connected, without reading from it.
pub struct PeerWatch(std::net::TcpStream);

impl PeerWatch {
    /// A watch on the connection of `req` (none when it is not a TCP connection).
    ///
    /// Must be called from the request's handler: the connection's dispatcher, which owns the
    /// socket, is polling the handler then, so the descriptor is open and is the request's.
    pub fn of(req: &HttpRequest) -> Option<Self> {
        let PeerSocket(fd) = *req.conn_data::<PeerSocket>()?;
        // SAFETY: see above; the descriptor is duplicated at once and the copy is owned here.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok()?;
        let stream = std::net::TcpStream::from(owned);
        stream.set_nonblocking(true).ok()?;
        Some(Self(stream))
    }

    /// Whether the client has closed its side of the connection.
    pub fn is_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        match self.0.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => true,
        }
    }

    /// Resolves once the client has gone away.
    pub async fn closed(&self) {
        loop {
            if self.is_closed() {
                return;
            }
            tokio::time::sleep(PEER_CHECK_INTERVAL).await;
        }
    }
}

/// Whether a request's `Content-Type` is JSON (`application/json`, any parameters).
pub fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The declared `Content-Length`, when there is one (an unreadable one counts as too long).
pub fn declared_length(req: &HttpRequest) -> Option<u64> {
    let value = req.headers().get(actix_web::http::header::CONTENT_LENGTH)?;
    Some(value.to_str().ok().and_then(|v| v.trim().parse().ok()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_budget_leaves_room_and_never_reaches_zero() {
        assert_eq!(connections_per_worker(20_000, 2), (20_000 - 512) / 4);
        assert_eq!(connections_per_worker(100, 8), 16);
        assert!(raise_fd_limit() >= 64);
    }

    #[test]
    fn a_closed_peer_is_seen_and_an_open_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("an address")).expect("connected");
        let (server, _) = listener.accept().expect("accepted");
        server.set_nonblocking(true).expect("nonblocking");
        let watch = PeerWatch(server);
        assert!(!watch.is_closed());
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
        assert!(watch.is_closed());
    }
}
