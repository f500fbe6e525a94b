//! `POST /evaluation/{id}/rerun` and `cdtester rerun` on 2 real node processes: a rerun of the
//! failed modules runs exactly those (a passing project and a passing module are left out), each
//! gives the counts it gave the first time, and with the modules left out they add up to the
//! first evaluation's totals; a rerun by test node id runs the module holding it; bad requests
//! get 4xx answers.

mod common;
mod node_common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const OK: &str = "def test_a():\n    assert True\n\ndef test_b():\n    assert True\n";
const BAD: &str = "def test_pass():\n    assert True\n\ndef test_fail():\n    assert 1 == 2\n";
const ERR: &str = "import pytest\n\n@pytest.fixture\ndef broken():\n    raise RuntimeError('boom')\n\n\
                   def test_uses(broken):\n    pass\n\ndef test_fine():\n    pass\n";

fn modules(report: &Value, project: &str) -> BTreeSet<String> {
    report["projects"][project]["modules"].as_object().expect("modules").keys().cloned().collect()
}

fn tests_of(report: &Value, project: &str) -> BTreeMap<String, u64> {
    let t = report["projects"][project]["tests"].as_object().expect("tests");
    t.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect()
}

async fn post_rerun(http: std::net::SocketAddr, id: u64, body: &str) -> (StatusCode, Value) {
    node_common::call(
        http,
        Method::POST,
        &format!("/evaluation/{id}/rerun"),
        Some(("application/json", body.into())),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reruns_run_only_the_selected_modules_and_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let c = node_common::cluster(2, &dir.path().join("nodes"), &[]).await;
    let http = c.nodes[0].http;
    let src = dir.path().join("src");
    common::write_file(&src.join("mixed"), "tests/test_ok.py", OK);
    common::write_file(&src.join("mixed"), "tests/test_bad.py", BAD);
    common::write_file(&src.join("mixed"), "tests/test_err.py", ERR);
    common::write_file(&src.join("clean"), "tests/test_all.py", OK);
    let zip = node_common::zip_projects(&[("mixed", src.join("mixed")), ("clean", src.join("clean"))]);
    let first_id = node_common::submit_zip(http, &zip).await;
    let first = node_common::wait_finished(http, first_id, Duration::from_secs(300)).await;

    // The failed modules, through the CLI.
    let out = common::output(common::cdtester(&dir.path().join("cli")).args([
        "rerun",
        &first_id.to_string(),
        "--node",
        &http.to_string(),
        "--wait",
        "--json",
    ]));
    assert!(out.status.success(), "{}", common::describe(&out));
    let rerun = common::run_json(&out);
    let names: Vec<&String> = rerun["projects"].as_object().expect("projects").keys().collect();
    assert_eq!(names, ["mixed"], "{rerun}");
    let failed: BTreeSet<String> = ["tests/test_bad.py", "tests/test_err.py"].map(String::from).into();
    assert_eq!(modules(&rerun, "mixed"), failed);
    for m in &failed {
        let (a, b) = (&first["projects"]["mixed"]["modules"][m], &rerun["projects"]["mixed"]["modules"][m]);
        assert_eq!(a["counts"], b["counts"], "{m}");
    }
    // The rerun's tests plus the modules left out are the first evaluation's tests.
    let mut sum = tests_of(&rerun, "mixed");
    let left_out = &first["projects"]["mixed"]["modules"]["tests/test_ok.py"]["counts"];
    for (k, v) in left_out.as_object().expect("counts") {
        *sum.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
    }
    assert_eq!(sum, tests_of(&first, "mixed"));
    assert_eq!(rerun["projects"]["mixed"]["total_failed"], 2, "{rerun}");

    // By test node id: the module holding it, in every project that has it.
    let (s, v) = post_rerun(http, first_id, r#"{"only": ["tests/test_ok.py::test_a"]}"#).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rerun_of"], first_id);
    assert_eq!(v["modules"], json!({"mixed": ["tests/test_ok.py"]}));
    let by_id =
        node_common::wait_finished(http, v["eval_id"].as_u64().expect("id"), Duration::from_secs(300)).await;
    assert_eq!(modules(&by_id, "mixed"), ["tests/test_ok.py".to_string()].into());
    assert!(by_id["projects"].get("clean").is_none(), "{by_id}");
    assert_eq!(by_id["projects"]["mixed"]["total_passed"], 2);

    // Bad requests.
    for (id, body, want) in [
        (424242, "", StatusCode::NOT_FOUND),
        (first_id, r#"{"only": "all"}"#, StatusCode::BAD_REQUEST),
        (first_id, r#"{"only": ["nope.py::test"]}"#, StatusCode::BAD_REQUEST),
        (first_id, "not json", StatusCode::BAD_REQUEST),
        (first_id, r#"{"only": "failed", "extra": 1}"#, StatusCode::BAD_REQUEST),
    ] {
        let (s, v) = post_rerun(http, id, body).await;
        assert_eq!(s, want, "{body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // Not declared JSON (what a cross-site form or no-cors request sends): refused.
    let (s, v) = node_common::call(
        http,
        Method::POST,
        &format!("/evaluation/{first_id}/rerun"),
        Some(("text/plain", Vec::new())),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
}
