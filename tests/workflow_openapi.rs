//! `GET /openapi.json` describes exactly the routes the node serves: every route pattern
//! registered in `node/src/http/` is a documented path, and on a live node every documented
//! (path, method) answers from its handler while every other method of that path gets 405. Also
//! the dashboard's page and assets carry the strict Content-Security-Policy.

mod common;
mod node_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use cdtester::peer_http::client::ClientError;
use hyper::{Method, StatusCode};

/// Route patterns registered with `.route("...")` in the HTTP sources.
fn routes_in_source() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("src/http") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("source");
        for part in text.split(".route(\"").skip(1) {
            out.insert(part.split('"').next().expect("pattern").to_string());
        }
    }
    out
}

/// A concrete path for a documented pattern.
fn concrete(pattern: &str) -> String {
    pattern
        .replace("{id}", "424242")
        .replace("{project_id}", "424242-0")
        .replace("{file}", "dashboard.js")
        .replace("{project}", "calc")
}

/// Status and body of a request (error statuses included).
async fn request(http: std::net::SocketAddr, method: Method, path: &str) -> (StatusCode, String) {
    match node_common::client().send(method, http, path, None, Duration::from_secs(30)).await {
        Ok(r) => (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        Err(ClientError::Status { status, body, .. }) => (status, body),
        Err(e) => panic!("{path}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_paths_and_methods_equal_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let c = node_common::cluster(1, dir.path(), &[]).await;
    let http = c.nodes[0].http;
    let (status, doc) = node_common::get(http, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let documented: BTreeSet<String> = paths.keys().cloned().collect();
    assert_eq!(documented, routes_in_source(), "documented paths vs routes in node/src/http");

    let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH];
    for (pattern, ops) in paths {
        let path = concrete(pattern);
        for m in &methods {
            let (status, body) = request(http, m.clone(), &path).await;
            let is_documented = ops.get(m.as_str().to_ascii_lowercase()).is_some();
            if is_documented {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}: {body}");
                assert!(!body.contains("no such route"), "{m} {path} reached the fallback: {body}");
                assert!(!status.is_server_error(), "{m} {path}: {status} {body}");
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path} is served but not documented");
            }
        }
    }
    let (status, body) = request(http, Method::GET, "/not/a/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no such route"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_page_and_assets_have_a_strict_csp() {
    let dir = tempfile::tempdir().unwrap();
    let c = node_common::cluster(1, dir.path(), &[]).await;
    let http = c.nodes[0].http;
    for (path, ct) in [
        ("/", "text/html"),
        ("/assets/dashboard.js", "text/javascript"),
        ("/assets/dashboard.css", "text/css"),
    ] {
        let r = node_common::client()
            .send(Method::GET, http, path, None, Duration::from_secs(30))
            .await
            .expect(path);
        let header = |k: &str| r.headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert!(header("content-type").starts_with(ct), "{path}: {}", header("content-type"));
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(header("x-content-type-options"), "nosniff");
    }
    let page = node_common::get_raw(http, "/").await;
    assert!(!page.contains("<script>") && !page.contains("style="), "inline script or style in the page");
    let js = node_common::get_raw(http, "/assets/dashboard.js").await;
    for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
        assert!(!js.contains(sink), "the dashboard script uses {sink}");
    }
    let (status, _) = request(http, Method::GET, "/assets/..%2Fcluster.secret").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
