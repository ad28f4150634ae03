//! The browser demo page of `gapless dev`: `GET /demo` serves `clients/js/demo/index.html`
//! and `GET /demo/gapless.js` the browser client's minified bundle
//! (`clients/js/dist/gapless.min.js`), both built into the binary. Routed only when
//! [`Config::demo`](crate::Config::demo) is on, which only `gapless dev` does.
//!
//! The page shows a device of DESIGN.md §1 from the outside: it connects to an edge with the
//! client of §5.2 and appends through this ingest's `POST /v1/notifications`. It holds no
//! secrets: `gapless dev` prints a URL whose fragment (`#edge=…&user=…&token=…&key=…`)
//! carries them, and a fragment never reaches a server or its logs.

use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The page: one HTML file with its CSS and script inline.
pub const PAGE: &str = include_str!("../../clients/js/demo/index.html");

/// The client, one minified ES module exporting `GaplessClient` (built by
/// `node scripts/build.mjs` in `clients/js` and committed, so this build needs no Node).
pub const BUNDLE: &str = include_str!("../../clients/js/dist/gapless.min.js");

pub use crate::page::NONCE_PLACEHOLDER;

/// The demo's routes, for any router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/demo", get(page))
        .route("/demo/gapless.js", get(bundle))
}

/// `GET /demo`. The policy lets in only the page's own inline style and script (by a fresh
/// nonce), modules from this origin and connections anywhere (the edge is another origin,
/// reached over HTTP, SSE or WebSocket); nothing is cached, since the page is rendered per
/// answer.
async fn page() -> Response {
    crate::page::with_nonce(PAGE, |nonce| {
        format!(
            "default-src 'none'; script-src 'self' 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
             connect-src 'self' http: https: ws: wss:; img-src data:; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        )
    })
}

/// `GET /demo/gapless.js`. Revalidated on every load (`no-cache`), so a rebuilt `gapless`
/// never runs a stale client under a new page.
async fn bundle() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        BUNDLE,
    )
        .into_response()
}
