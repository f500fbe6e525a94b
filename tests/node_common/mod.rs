//! Helpers of the node end-to-end tests (`api_*`, `node_*`, `fault_*`): a cluster of real
//! `cdtester node` processes on 127.0.0.1 and HTTP calls against it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cdtester::demo::LocalCluster;
use cdtester::peer_http::client::{HttpClient, multipart_file};
use hyper::{Method, StatusCode};
use serde_json::Value;

use crate::common;

/// A cluster of `n` nodes (fast timers; shared Python environments), meshed.
pub async fn cluster(n: usize, dir: &Path, extra_env: &[(&str, &str)]) -> LocalCluster {
    let mut env: Vec<(String, String)> = vec![
        (
            "CDT_RUNNER__LOCAL__VENV_DIR".into(),
            common::cache_dir().join("venvs").to_string_lossy().into_owned(),
        ),
        ("CDT_LOG".into(), "info,cdtester::core=warn".into()),
        ("CDT_RUNNER__WORKERS".into(), "1".into()),
    ];
    env.retain(|(k, _)| !extra_env.iter().any(|(e, _)| e == k));
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut c = LocalCluster::new(common::cdtester_bin(), dir.to_path_buf(), env);
    c.start(n).expect("start nodes");
    c.wait_mesh(Duration::from_secs(30)).await.expect("mesh");
    c
}

pub fn client() -> HttpClient {
    HttpClient::new(Default::default(), None)
}

/// A raw request: status and JSON body (non-2xx answers too).
pub async fn call(
    http: SocketAddr,
    method: Method,
    path: &str,
    body: Option<(&str, Vec<u8>)>,
) -> (StatusCode, Value) {
    match client().send(method.clone(), http, path, body, Duration::from_secs(120)).await {
        Ok(r) => (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null)),
        Err(cdtester::peer_http::client::ClientError::Status { status, body, .. }) => {
            (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
        }
        Err(e) => panic!("{method} {path} on {http}: {e}"),
    }
}

pub async fn get(http: SocketAddr, path: &str) -> (StatusCode, Value) {
    call(http, Method::GET, path, None).await
}

/// Submits a zip; returns the evaluation id (panics on refusal).
pub async fn submit_zip(http: SocketAddr, zip: &[u8]) -> u64 {
    let (ct, body) = multipart_file("file", "projects.zip", zip);
    let (status, v) = call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "submitted", "{v}");
    v["eval_id"].as_u64().unwrap_or_else(|| panic!("no eval id: {v}"))
}

/// Submits git URLs as JSON.
pub async fn submit_urls(http: SocketAddr, urls: &[String]) -> (StatusCode, Value) {
    let body = serde_json::to_vec(&serde_json::json!({ "auth_token": "not-a-real-token", "projects": urls }))
        .unwrap();
    call(http, Method::POST, "/evaluation", Some(("application/json", body))).await
}

/// Polls `GET /evaluation/{id}` until it is finished.
pub async fn wait_finished(http: SocketAddr, id: u64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, v) = get(http, &format!("/evaluation/{id}")).await;
        if status == StatusCode::OK && v["status"] == "finished" {
            return v;
        }
        assert!(Instant::now() < deadline, "evaluation {id} not finished after {timeout:?}: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls until the evaluation has at least `n` finished modules (or panics).
pub async fn wait_executed(http: SocketAddr, id: u64, n: u64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, v) = get(http, &format!("/evaluation/{id}")).await;
        if status == StatusCode::OK && v["summary"]["executed"].as_u64().unwrap_or(0) >= n {
            return v;
        }
        assert!(Instant::now() < deadline, "evaluation {id}: fewer than {n} modules after {timeout:?}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per project, per module: the six pytest counts of a finished report.
pub fn module_counts(report: &Value) -> BTreeMap<String, BTreeMap<String, [u64; 6]>> {
    let mut out = BTreeMap::new();
    for (name, p) in report["projects"].as_object().expect("projects") {
        let mut mods = BTreeMap::new();
        for (m, v) in p["modules"].as_object().expect("modules") {
            let c = &v["counts"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            mods.insert(
                m.clone(),
                [n("passed"), n("failed"), n("skipped"), n("error"), n("xfailed"), n("xpassed")],
            );
        }
        out.insert(name.clone(), mods);
    }
    out
}

/// A project whose modules each sleep `secs` and then run `per_module` tests with a fixed
/// mix of outcomes: test i passes unless i % 3 == 2 (fails); module 0 also has one skip.
pub fn sleepy_project(root: &Path, modules: usize, per_module: usize, secs: f64) {
    for m in 0..modules {
        let mut text = format!("import time\nimport pytest\n\ntime.sleep({secs})\n\n");
        for i in 0..per_module {
            let body = if i % 3 == 2 { "assert 1 == 2" } else { "assert True" };
            text.push_str(&format!("def test_{i}():\n    {body}\n\n"));
        }
        if m == 0 {
            text.push_str("@pytest.mark.skip(reason='demo')\ndef test_skipped():\n    pass\n");
        }
        common::write_file(root, &format!("tests/test_m{m}.py"), &text);
    }
}

/// The counts `sleepy_project` must give per module.
pub fn sleepy_expected(modules: usize, per_module: usize) -> BTreeMap<String, [u64; 6]> {
    let failed = (0..per_module).filter(|i| i % 3 == 2).count() as u64;
    (0..modules)
        .map(|m| {
            let skipped = u64::from(m == 0);
            (format!("tests/test_m{m}.py"), [per_module as u64 - failed, failed, skipped, 0, 0, 0])
        })
        .collect()
}

/// Zips folders, one top-level folder per project.
pub fn zip_projects(projects: &[(&str, PathBuf)]) -> Vec<u8> {
    let list: Vec<(String, PathBuf)> = projects.iter().map(|(n, p)| (n.to_string(), p.clone())).collect();
    cdtester::fetch::pack_projects(&list).expect("zip projects")
}

/// `/stats` `all` as (passed, failed, projects, evaluations).
pub fn stats_all(v: &Value) -> (u64, u64, u64, u64) {
    let a = &v["all"];
    let n = |k: &str| a[k].as_u64().unwrap_or_else(|| panic!("/stats all.{k} missing: {v}"));
    (n("passed"), n("failed"), n("projects"), n("evaluations"))
}

/// Checks the exact `/stats` shape: keys, order, and types.
pub fn assert_stats_shape(raw: &str) {
    let v: Value = serde_json::from_str(raw).expect("stats JSON");
    let top: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(top, ["all", "nodes"], "{raw}");
    assert!(raw.starts_with(r#"{"all":{"failed":"#), "key order of all: {raw}");
    let all = v["all"].as_object().expect("all");
    assert_eq!(all.len(), 4, "{raw}");
    for k in ["failed", "passed", "projects", "evaluations"] {
        assert!(all[k].is_u64(), "all.{k} not an integer: {raw}");
    }
    for n in v["nodes"].as_array().expect("nodes") {
        let o = n.as_object().expect("node");
        assert_eq!(o.len(), 6, "{raw}");
        assert!(o["address"].as_str().is_some_and(|a| a.parse::<SocketAddr>().is_ok()), "{raw}");
        for k in ["failed", "passed", "projects", "modules"] {
            assert!(o[k].is_u64(), "nodes[].{k}: {raw}");
        }
        assert!(o["evaluations"].as_array().is_some_and(|a| a.iter().all(Value::is_u64)), "{raw}");
    }
    let nodes_pos = raw.find(r#""nodes":[{"address":"#);
    assert!(nodes_pos.is_some() || raw.contains(r#""nodes":[]"#), "{raw}");
}

/// A GET of an internal route on node `i`, signed with the cluster secret as node 0 (a member).
pub async fn get_internal(c: &LocalCluster, i: usize, path: &str) -> (StatusCode, Value) {
    let secret = cdtester::peer_http::auth::Secret::new(c.secret());
    let member = HttpClient::new(secret, Some(c.nodes[0].udp.to_string()));
    match member.send(Method::GET, c.nodes[i].http, path, None, Duration::from_secs(30)).await {
        Ok(r) => (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null)),
        Err(cdtester::peer_http::client::ClientError::Status { status, body, .. }) => {
            (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
        }
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// Raw body of a GET.
pub async fn get_raw(http: SocketAddr, path: &str) -> String {
    let r = client().send(Method::GET, http, path, None, Duration::from_secs(30)).await.expect("GET");
    String::from_utf8(r.body.to_vec()).expect("utf-8")
}
