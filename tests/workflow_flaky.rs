//! Flaky tests, test history and the rerun link on 2 real node processes with
//! `runner.retries = 1` and `grading.flaky = "fail"`:
//! - a real pytest test that fails on its first attempt (it leaves a marker file) and passes on
//!   the second is reported `flaky` with both attempts (outcome, duration, message) kept, is
//!   listed in the project's `flaky`, graded as a failure, counted in grades.csv's `flaky`
//!   column and in `/metrics`; a test failing both times keeps both attempts and stays failed; a
//!   passing module runs once;
//! - `GET /history/{project}` after two evaluations of projects of the same name lists each
//!   test's two runs (same on both nodes: history is written from replicated results);
//! - a rerun's record names the evaluation it came from (`rerun_of`, replicated to the other
//!   node) and that evaluation lists it in `reruns`.

mod common;
mod node_common;

use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;

/// Fails on the first run in this project copy (it leaves a marker next to itself), passes after.
const ONCE: &str = "import os\n\n\
    MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), '.ran-once')\n\n\
    def test_once():\n    \
        if not os.path.exists(MARK):\n        \
            open(MARK, 'w').close()\n        \
            assert False, 'first attempt fails'\n\n\
    def test_always():\n    assert 1 == 2\n";
const FIXED: &str = "def test_once():\n    pass\n\ndef test_always():\n    assert 1 == 3\n";
const OK: &str = "def test_fine():\n    pass\n";

fn tests_of<'a>(report: &'a Value, project: &str, module: &str) -> &'a Vec<Value> {
    report["projects"][project]["modules"][module]["tests"].as_array().expect("tests")
}

fn test<'a>(tests: &'a [Value], nodeid: &str) -> &'a Value {
    tests.iter().find(|t| t["nodeid"] == nodeid).unwrap_or_else(|| panic!("no {nodeid} in {tests:?}"))
}

fn outcomes(v: &Value, key: &str) -> Vec<String> {
    v[key].as_array().expect(key).iter().map(|a| a["outcome"].as_str().unwrap_or("?").to_string()).collect()
}

async fn submit(http: std::net::SocketAddr, src: &std::path::Path, flaky_module: &str) -> u64 {
    common::write_file(&src.join("flaky"), "tests/test_flaky.py", flaky_module);
    common::write_file(&src.join("flaky"), "tests/test_ok.py", OK);
    let zip = node_common::zip_projects(&[("flaky", src.join("flaky"))]);
    node_common::submit_zip(http, &zip).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_tests_history_and_rerun_links_on_two_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("CDT_RUNNER__RETRIES", "1"), ("CDT_GRADING__FLAKY", "fail")];
    let c = node_common::cluster(2, &dir.path().join("nodes"), &env).await;
    let (http, other) = (c.nodes[0].http, c.nodes[1].http);

    // Evaluation 1: test_once fails, then passes; test_always fails twice.
    let first_id = submit(http, &dir.path().join("src1"), ONCE).await;
    let first = node_common::wait_finished(http, first_id, Duration::from_secs(300)).await;
    let tests = tests_of(&first, "flaky", "tests/test_flaky.py");
    let once = test(tests, "tests/test_flaky.py::test_once");
    assert_eq!(once["outcome"], "flaky", "{once}");
    assert_eq!(outcomes(once, "attempts"), ["failed", "passed"], "{once}");
    let attempts = once["attempts"].as_array().expect("attempts");
    assert!(attempts[0]["message"].as_str().is_some_and(|m| m.contains("first attempt fails")), "{once}");
    assert!(attempts[1].get("message").is_none(), "{once}");
    let sum: f64 = attempts.iter().map(|a| a["duration"].as_f64().expect("duration")).sum();
    assert!((once["duration"].as_f64().expect("duration") - sum).abs() < 1e-9, "{once}");
    let always = test(tests, "tests/test_flaky.py::test_always");
    assert_eq!(always["outcome"], "failed", "{always}");
    assert_eq!(outcomes(always, "attempts"), ["failed", "failed"], "{always}");
    let fine = test(tests_of(&first, "flaky", "tests/test_ok.py"), "tests/test_ok.py::test_fine");
    assert!(fine.get("attempts").is_none(), "a passing module runs once: {fine}");

    let p = &first["projects"]["flaky"];
    assert_eq!(p["flaky"], serde_json::json!(["tests/test_flaky.py::test_once"]), "{p}");
    assert_eq!((p["tests"]["flaky"].as_u64(), p["tests"]["passed"].as_u64()), (Some(1), Some(1)), "{p}");
    assert_eq!(p["total_passed"], 1, "a flaky test is never counted as passed: {p}");
    // grading.flaky = "fail": 1 pass (test_fine) out of 3 graded tests.
    assert_eq!(p["grade"].as_f64(), Some(6.67), "{p}");
    assert_eq!(first["summary"]["tests"]["flaky"], 1);

    let csv = node_common::get_raw(http, &format!("/evaluation/{first_id}/grades.csv")).await;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("project,grade,passed,failed,errors,skipped,status,url,flaky"));
    assert_eq!(lines.next(), Some("flaky,6.67,1,1,0,0,finished,,1"), "{csv}");
    let metrics = node_common::get_raw(http, "/metrics").await;
    assert!(metrics.lines().any(|l| l == "cdtester_tests_total{outcome=\"flaky\"} 1"), "{metrics}");

    // Evaluation 2 of a project of the same name: test_once passes at once.
    let second_id = submit(http, &dir.path().join("src2"), FIXED).await;
    let second = node_common::wait_finished(http, second_id, Duration::from_secs(300)).await;
    let tests = tests_of(&second, "flaky", "tests/test_flaky.py");
    assert_eq!(test(tests, "tests/test_flaky.py::test_once")["outcome"], "passed");
    assert_eq!(second["projects"]["flaky"]["grade"].as_f64(), Some(13.33));

    // History: both runs of every test, on either node (each writes what it accepts or receives).
    let want = [
        ("tests/test_flaky.py::test_once", ["flaky", "passed"]),
        ("tests/test_flaky.py::test_always", ["failed", "failed"]),
        ("tests/test_ok.py::test_fine", ["passed", "passed"]),
    ];
    for node in [http, other] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let history = loop {
            let (status, h) = node_common::get(node, "/history/flaky").await;
            assert_eq!(status, StatusCode::OK, "{h}");
            // Each module's result replicates on its own: wait for both runs of every test.
            if want.iter().all(|(t, _)| h["tests"][t].as_array().is_some_and(|r| r.len() == 2)) {
                break h;
            }
            assert!(Instant::now() < deadline, "history on {node}: {h}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        assert_eq!(history["project"], "flaky");
        assert_eq!(history["tests"].as_object().expect("tests").len(), 3, "{history}");
        for (nodeid, expected) in &want {
            let runs = &history["tests"][nodeid];
            let evals: Vec<u64> =
                runs.as_array().expect("runs").iter().filter_map(|r| r["eval"].as_u64()).collect();
            assert_eq!(evals, [first_id, second_id], "{nodeid} on {node}: {runs}");
            let got: Vec<&str> =
                runs.as_array().expect("runs").iter().filter_map(|r| r["outcome"].as_str()).collect();
            assert_eq!(got, expected, "{nodeid} on {node}");
            assert!(runs[0]["duration"].as_f64().is_some() && runs[0]["at"].as_f64().is_some(), "{runs}");
        }
    }
    let (status, h) = node_common::get(http, "/history/nobody").await;
    assert_eq!((status, h["tests"].as_object().map(|t| t.len())), (StatusCode::OK, Some(0)), "{h}");

    // The rerun's link, in its record and replicated.
    let (status, v) = node_common::call(
        http,
        Method::POST,
        &format!("/evaluation/{second_id}/rerun"),
        Some(("application/json", br#"{"only": "failed"}"#.to_vec())),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let rerun_id = v["eval_id"].as_u64().expect("rerun id");
    node_common::wait_finished(http, rerun_id, Duration::from_secs(300)).await;
    let rerun = node_common::wait_finished(other, rerun_id, Duration::from_secs(60)).await;
    assert_eq!(rerun["rerun_of"], second_id, "the other node's copy: {rerun}");
    let (_, second) = node_common::get(other, &format!("/evaluation/{second_id}?tests=false")).await;
    assert_eq!(second["reruns"], serde_json::json!([rerun_id]), "{second}");
    assert!(first.get("rerun_of").is_none() && first.get("reruns").is_none());
}
