//! The ingest's own HTML pages (the status page and the demo): each answer carries a fresh
//! `Content-Security-Policy` nonce that the page's inline `<style>` and `<script>` tags name,
//! and is never cached (the page is rendered per answer).

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::response::{IntoResponse, Response};

/// Where a page's tags ask for the nonce of the answer's `Content-Security-Policy`.
pub const NONCE_PLACEHOLDER: &str = "{{csp-nonce}}";

/// `page` with a fresh nonce in place of every [`NONCE_PLACEHOLDER`], under the policy
/// `policy` writes for that nonce.
pub fn with_nonce(page: &str, policy: impl FnOnce(&str) -> String) -> Response {
    let nonce = format!("{:032x}", rand::random::<u128>());
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (REFERRER_POLICY, "no-referrer"),
        ],
        [(CONTENT_SECURITY_POLICY, policy(&nonce))],
        page.replace(NONCE_PLACEHOLDER, &nonce),
    )
        .into_response()
}
