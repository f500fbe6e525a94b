//! Bad input against a real node: every request gets a clear 4xx JSON error, nothing is created,
//! and the node keeps serving. With a cluster secret, a forged `POST /task` from a non-member is
//! refused.

mod common;
mod node_common;

use std::io::Write;
use std::time::Duration;

use hyper::{Method, StatusCode};
use node_common::{call, get};

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in entries {
        w.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn multipart(zip: &[u8]) -> (String, Vec<u8>) {
    cdtester::peer_http::client::multipart_file("file", "x.zip", zip)
}

fn error_text(v: &serde_json::Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error message: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = node_common::cluster(1, dir.path(), &[("CDT_NODE__SECRET", "s3cret")]).await;
    let http = c.nodes[0].http;
    let post = |ct: Option<&'static str>, body: Vec<u8>| async move {
        match ct {
            Some(ct) => call(http, Method::POST, "/evaluation", Some((ct, body))).await,
            None => {
                let r = node_common::client()
                    .send(Method::POST, http, "/evaluation", None, Duration::from_secs(10))
                    .await;
                match r {
                    Err(cdtester::peer_http::client::ClientError::Status { status, body, .. }) => {
                        (status, serde_json::from_str(&body).unwrap())
                    }
                    other => panic!("expected an error status, got {other:?}"),
                }
            }
        }
    };

    // Content types.
    let (s, v) = post(Some("text/plain"), b"hello".to_vec()).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    assert!(error_text(&v).contains("multipart/form-data"), "{v}");
    let (s, v) = post(None, Vec::new()).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    assert!(error_text(&v).contains("missing Content-Type"), "{v}");

    // JSON bodies.
    let (s, v) = post(Some("application/json; charset=utf-8"), b"{bad".to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("invalid JSON"), "{v}");
    let (s, v) = post(Some("application/json"), br#"{"auth_token":"t"}"#.to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("non-empty list"), "{v}");
    let (s, v) = post(
        Some("application/json"),
        br#"{"token":"t","urls":["https://127.0.0.1:1/nothing.git"]}"#.to_vec(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(error_text(&v).contains("cannot clone https://127.0.0.1:1/nothing.git"), "{v}");
    assert!(!v.to_string().contains("\"t\""), "token must not be echoed: {v}");
    let (s, v) = post(Some("application/json"), br#"{"projects":["/nonexistent/repo"]}"#.to_vec()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("not accepted over HTTP"), "{v}");

    // Multipart bodies.
    let (ct, body) = multipart(b"this is not a zip");
    let (s, v) = call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("not a valid zip"), "{v}");
    let (ct, body) = multipart(&zip_of(&[("../evil/tests/test_x.py", b"def test_x(): pass\n")]));
    let (s, v) = call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("zip-slip"), "{v}");
    let many: Vec<(String, Vec<u8>)> = (0..50_001).map(|i| (format!("p/f{i}"), Vec::new())).collect();
    let refs: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    let (ct, body) = multipart(&zip_of(&refs));
    let (s, v) = call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("more than 50000 entries"), "{v}");
    let body = b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--b--\r\n".to_vec();
    let (s, v) =
        call(http, Method::POST, "/evaluation", Some(("multipart/form-data; boundary=b", body))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("\"file\""), "{v}");

    // Unknown ids and routes.
    for path in ["/evaluation/123456789", "/evaluation/not-a-number", "/nowhere"] {
        let (s, v) = get(http, path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        error_text(&v);
    }
    // Project archives are for members only when the cluster has a secret.
    let (s, v) = get(http, "/file/nope").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A forged result from a non-member (no cluster MAC), and one with a wrong MAC.
    let forged = br#"{"task_id":"1-0::tests/test_a.py","passed":99,"failed":0,"time":0.5,"project_id":"1-0","module":"tests/test_a.py","ip":"127.0.0.1","port":"9"}"#;
    let (s, v) = call(http, Method::POST, "/task", Some(("application/json", forged.to_vec()))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let forger = cdtester::peer_http::client::HttpClient::new(
        cdtester::peer_http::auth::Secret::new(Some("guess")),
        Some("127.0.0.1:9".into()),
    );
    let err = forger
        .send(
            Method::POST,
            http,
            "/task",
            Some(("application/json", forged.to_vec())),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN), "{err}");
    let (s, v) = call(http, Method::POST, "/task", Some(("text/plain", b"x".to_vec()))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");

    // Nothing was created and the node still serves.
    let (s, v) = get(http, "/evaluation").await;
    assert_eq!((s, v.clone()), (StatusCode::OK, serde_json::json!([])), "{v}");
    let (s, v) = get(http, "/stats").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(node_common::stats_all(&v), (0, 0, 0, 0));
    assert!(c.nodes[0].is_running());

    // A project without tests: accepted, then reported as failed with the reason.
    let proj = dir.path().join("empty");
    common::write_file(&proj, "README.md", "no tests here\n");
    let id = node_common::submit_zip(http, &node_common::zip_projects(&[("empty", proj)])).await;
    let r = node_common::wait_finished(http, id, Duration::from_secs(180)).await;
    assert_eq!(r["projects"]["empty"]["status"], "failed", "{r}");
    assert!(r["projects"]["empty"]["error"].as_str().is_some_and(|e| e.contains("no test")), "{r}");
    c.shutdown();
}
