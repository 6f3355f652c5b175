//! One request followed across services. Every message about one request (a generation
//! request, a submit, an error or a chunk for the client) carries its id in the
//! [`REQUEST_ID_HEADER`] NATS header, and each service handles such a message inside a
//! `request` span holding the id ([`request_span!`](crate::request_span)): every log line about
//! the request names it, in text (`request{request_id="…"}`) and in JSON logs (the span's
//! `request_id`).
//!
//! Headers are untrusted input like the rest of a message: an id that is not a valid request
//! id is ignored.

use async_nats::HeaderMap;
use pagemesh_shared::limits;

/// The NATS header naming the request a message is about.
pub const REQUEST_ID_HEADER: &str = "Pagemesh-Request-Id";

/// Headers naming `request_id` (none when it is not a valid request id).
pub fn headers(request_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if limits::check_request_id(request_id).is_ok() {
        headers.insert(REQUEST_ID_HEADER, request_id);
    }
    headers
}

/// The request a message names in its headers, if it names a valid one.
pub fn request_id(headers: Option<&HeaderMap>) -> Option<String> {
    let value = headers?.get(REQUEST_ID_HEADER)?.as_str();
    limits::check_request_id(value).is_ok().then(|| value.to_string())
}

/// The span of work on one request, under the calling module's target (so that the filter
/// that lets a service's events through keeps the span too) and at the `error` level (so that
/// it is there whenever that service logs anything at all).
#[macro_export]
macro_rules! request_span {
    ($request_id:expr) => {
        ::tracing::error_span!("request", request_id = %$request_id)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_travels_in_the_headers() {
        let headers = headers("cmpl-42");
        assert_eq!(request_id(Some(&headers)).as_deref(), Some("cmpl-42"));
        assert_eq!(request_id(None), None);
        assert_eq!(request_id(Some(&HeaderMap::new())), None);
    }

    #[test]
    fn ids_that_are_not_request_ids_are_neither_sent_nor_read() {
        let too_long = "x".repeat(limits::MAX_REQUEST_ID_LEN + 1);
        for bad in ["", too_long.as_str(), "new\nline"] {
            assert!(headers(bad).get(REQUEST_ID_HEADER).is_none(), "{bad:?} sent");
            let mut forged = HeaderMap::new();
            forged.insert(REQUEST_ID_HEADER, bad);
            assert_eq!(request_id(Some(&forged)), None, "{bad:?} read");
        }
    }
}
