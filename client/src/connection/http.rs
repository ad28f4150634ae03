//! What the SSE and long-poll transports share: their endpoints derived from the configured
//! WebSocket URL, one reqwest client (and so one connection pool) per local address, the
//! credentials header, and readable refusals.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use gapless_shared::api::ErrorEnvelope;

use super::Failure;
use crate::config::ClientConfig;
use crate::disconnect::Disconnect;

/// The edge endpoint `path` (`/v1/sse`, `/v1/poll`, `/v1/ack`) of a configured URL:
/// `ws://host:port/v1/ws` -> `http://host:port<path>`, `wss` -> `https`; a URL whose path
/// is not a gapless endpoint is a base (`ws://host:port`, `http://host/prefix`) the path is
/// appended to. The query (`?device=`, `?token=`) is kept.
pub(crate) fn endpoint(url: &str, path: &str) -> Result<Url, Failure> {
    let mut url = Url::parse(url).map_err(|e| Failure::config(format!("bad URL {url:?}: {e}")))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "http",
        "wss" | "https" => "https",
        other => return Err(Failure::config(format!("unsupported URL scheme {other:?}"))),
    };
    // ws, wss, http and https are all special schemes: switching among them cannot fail.
    url.set_scheme(scheme)
        .map_err(|()| Failure::config("cannot switch the URL to HTTP"))?;
    let base = url.path().trim_end_matches('/');
    let base = ["/v1/ws", "/v1/sse", "/v1/poll", "/v1/ack"]
        .iter()
        .find_map(|p| base.strip_suffix(p))
        .unwrap_or(base);
    let full = format!("{base}{path}");
    url.set_path(&full);
    Ok(url)
}

/// `Authorization: Bearer <token>`, marked sensitive (kept out of debug output).
pub(crate) fn bearer(config: &ClientConfig) -> Result<HeaderValue, Failure> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", config.token))
        .map_err(|_| Failure::config("the token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Adds the credentials to a request.
pub(crate) fn authorized(
    request: reqwest::RequestBuilder,
    bearer: &HeaderValue,
) -> reqwest::RequestBuilder {
    request.header(AUTHORIZATION, bearer.clone())
}

thread_local! {
    /// The HTTP client of each local address (`None`: the system picks), shared by every
    /// connection opened on this thread. A load process holds thousands of connections: one
    /// client each would mean thousands of pools and resolvers. Per thread, not per process:
    /// a pooled connection is a task of the runtime that opened it, and a thread belongs to
    /// one runtime, so two runtimes (parallel tests) never share a pool and never hand each
    /// other a connection whose task died with its runtime.
    static CLIENTS: RefCell<HashMap<Option<IpAddr>, reqwest::Client>> =
        RefCell::new(HashMap::new());
}

/// The shared HTTP client for `config.local_addr`'s address. Its port is not used: reqwest
/// binds the address with port 0, so the system picks the port.
pub(crate) fn client(config: &ClientConfig) -> Result<reqwest::Client, Failure> {
    let local = config.local_addr.map(|a| a.ip());
    CLIENTS.with(|clients| {
        let mut clients = clients.borrow_mut();
        if let Some(client) = clients.get(&local) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder()
            // Polls follow each other on the same connection; an idle one is kept a little
            // past the longest wait between two.
            .pool_idle_timeout(Duration::from_secs(90));
        if let Some(ip) = local {
            // A chosen source address is a load generator's: no proxy from the environment
            // between it and the edge.
            builder = builder.local_address(ip).no_proxy();
        }
        let client = builder
            .build()
            .map_err(|e| Failure::config(format!("cannot build an HTTP client: {e}")))?;
        clients.insert(local, client.clone());
        Ok(client)
    })
}

/// Largest part of a refusal's body read.
const REFUSAL_BODY_LIMIT: usize = 4 << 10;

/// A non-success answer as a failure: its status, the edge's JSON error and `Retry-After`.
/// The body is read for at most `within`.
pub(crate) async fn refusal(mut response: reqwest::Response, within: Duration) -> Failure {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let mut body = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while body.len() < REFUSAL_BODY_LIMIT {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
    })
    .await;
    body.truncate(REFUSAL_BODY_LIMIT);
    Failure {
        reason: refusal_reason(status, &body),
        retry_after,
    }
}

/// A refusal from its status and body: the edges' JSON error body
/// (`gapless_shared::api::ErrorEnvelope`), else the first line of the text.
pub(crate) fn refusal_reason(status: StatusCode, body: &[u8]) -> Disconnect {
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(b) => Disconnect::Refused {
            status: status.as_u16(),
            code: Some(b.error.code.into_owned()),
            message: b.error.message,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            Disconnect::Refused {
                status: status.as_u16(),
                code: None,
                message: text.lines().next().unwrap_or_default().trim().to_owned(),
            }
        }
    }
}

/// `Retry-After` in seconds (the edges never send an HTTP date).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// A reqwest error, readable: reqwest's own text names only the outermost layer.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_map_to_the_http_endpoints() {
        let cases = [
            ("ws://127.0.0.1:8080/v1/ws", "http://127.0.0.1:8080/v1/sse"),
            ("wss://edge.example/v1/ws", "https://edge.example/v1/sse"),
            ("ws://127.0.0.1:8080", "http://127.0.0.1:8080/v1/sse"),
            ("ws://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/sse"),
            ("http://h:1/prefix/", "http://h:1/prefix/v1/sse"),
            ("ws://h:1/prefix/v1/ws/", "http://h:1/prefix/v1/sse"),
            ("ws://h/v1/ws?device=phone", "http://h/v1/sse?device=phone"),
            ("ws://h:80/v1/ws", "http://h/v1/sse"),
            ("ws://h/v1/poll", "http://h/v1/sse"),
        ];
        for (from, to) in cases {
            assert_eq!(
                endpoint(from, "/v1/sse").expect(from).as_str(),
                to,
                "{from}"
            );
        }
        assert_eq!(
            endpoint("ws://h/v1/ws", "/v1/poll")
                .expect("valid")
                .as_str(),
            "http://h/v1/poll"
        );
        assert!(endpoint("ftp://h/", "/v1/sse").is_err());
        assert!(endpoint("not a url", "/v1/sse").is_err());
    }

    #[test]
    fn refusals_read_the_edges_error_body() {
        let body = br#"{"error":{"code":"unauthorized","message":"token expired"}}"#;
        assert_eq!(
            refusal_reason(StatusCode::UNAUTHORIZED, body).to_string(),
            "refused: 401: unauthorized: token expired"
        );
        assert_eq!(
            refusal_reason(StatusCode::BAD_GATEWAY, b"upstream gone\nmore"),
            Disconnect::Refused {
                status: 502,
                code: None,
                message: "upstream gone".into()
            }
        );
        assert_eq!(
            refusal_reason(StatusCode::SERVICE_UNAVAILABLE, b"").to_string(),
            "refused: 503"
        );
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2026"));
        assert_eq!(retry_after(&headers), None);
    }
}
