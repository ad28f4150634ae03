//! The demo page of `gapless dev` (`gapless_ingest::demo`): absent unless the config turns
//! it on, and when on, the page and the client bundle with their content types, no caching
//! of the page and a policy that lets in only the page's own nonce-tagged inline code.

mod common;

use common::{TestIngest, error_code};
use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};

async fn get(ingest: &TestIngest, path: &str) -> reqwest::Response {
    ingest
        .http
        .get(ingest.url(path))
        .send()
        .await
        .expect("the ingest answers")
}

fn header(response: &reqwest::Response, name: reqwest::header::HeaderName) -> &str {
    response
        .headers()
        .get(&name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("an ASCII header")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_is_not_found_unless_switched_on() {
    let ingest = TestIngest::start().await;
    for path in ["/demo", "/demo/gapless.js"] {
        let (status, body) = common::json_of(get(&ingest, path).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(error_code(&body), "not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_page_and_the_bundle_when_switched_on() {
    let ingest = TestIngest::start_with(&[], |config| config.demo = true).await;

    // Public: the page carries no secrets, so it needs no API key.
    let page = get(&ingest, "/demo").await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(header(&page, CONTENT_TYPE), "text/html; charset=utf-8");
    assert_eq!(header(&page, CACHE_CONTROL), "no-store");
    let policy = header(&page, CONTENT_SECURITY_POLICY).to_owned();
    let nonce = policy
        .split("'nonce-")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap_or_else(|| panic!("no nonce in {policy}"))
        .to_owned();
    assert!(nonce.len() >= 32, "a short nonce: {nonce}");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    let html = page.text().await.expect("the page arrives");
    assert!(
        !html.contains(gapless_ingest::demo::NONCE_PLACEHOLDER),
        "placeholder left in the page"
    );
    assert!(html.contains(&format!("<script type=\"module\" nonce=\"{nonce}\">")));
    assert!(html.contains(&format!("<style nonce=\"{nonce}\">")));
    assert!(html.contains("from '/demo/gapless.js'"));

    // Each answer has its own nonce.
    let again = get(&ingest, "/demo").await;
    assert_ne!(header(&again, CONTENT_SECURITY_POLICY), policy);

    let bundle = get(&ingest, "/demo/gapless.js").await;
    assert_eq!(bundle.status(), StatusCode::OK);
    assert_eq!(
        header(&bundle, CONTENT_TYPE),
        "text/javascript; charset=utf-8"
    );
    let js = bundle.text().await.expect("the bundle arrives");
    assert_eq!(js, gapless_ingest::demo::BUNDLE);
    assert!(js.contains("GaplessClient"), "the bundle exports no client");

    // The API is unchanged beside it.
    let (status, body) = common::json_of(get(&ingest, "/demo/other").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
