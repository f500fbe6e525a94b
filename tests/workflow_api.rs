//! The course staff's API on 3 real node processes: `GET /evaluation/{id}/grades.csv` equals
//! the report of `GET /evaluation/{id}` row by row (parsed by Python's csv module, formula-like
//! student names neutralised) and `cdtester grades` writes the same bytes; `GET /metrics` parses
//! with the Prometheus client's text-format parser and its counters move while an evaluation
//! runs; `GET /evaluation/{id}/events` streams reports until the evaluation ends, and
//! `cdtester watch` follows it to the graded table; a roster
//! submission (`cdtester submit --roster`, and its JSON form) names projects after students; a
//! member killed with SIGKILL moves the failure detection and election counters.

mod common;
mod node_common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A formula-like project name with a comma (quoted and guarded in the CSV).
const FORMULA_NAME: &str = "=SUM(1,2)";

/// Runs Python `code` with `input` on stdin; returns its stdout as JSON.
fn python_json(code: &str, input: &[u8]) -> Value {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(code)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("python3 printed JSON")
}

const PARSE_METRICS: &str = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
fams, samples = {}, []
for f in text_string_to_metric_families(sys.stdin.read()):
    fams[f.name] = f.type
    samples += [[s.name, s.labels, s.value] for s in f.samples]
print(json.dumps({"families": fams, "samples": samples}))
"#;

const PARSE_CSV: &str = "import sys, csv, io, json\nprint(json.dumps(list(csv.reader(io.StringIO(sys.stdin.read(), newline='')))))";

/// A scrape parsed by `prometheus_client`: family types and samples.
struct Scrape {
    families: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    async fn of(http: SocketAddr) -> Scrape {
        let text = node_common::get_raw(http, "/metrics").await;
        let v = python_json(PARSE_METRICS, text.as_bytes());
        let families =
            serde_json::from_value(v["families"].clone()).unwrap_or_else(|e| panic!("{e}: {v}\n{text}"));
        let samples =
            serde_json::from_value(v["samples"].clone()).unwrap_or_else(|e| panic!("{e}: {v}\n{text}"));
        Scrape { families, samples }
    }

    /// Sum of the samples named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// A sleepy project (6 modules of 2 s) and the demo's `calc` under a formula-like name.
fn projects(dir: &Path) -> Vec<u8> {
    let demo = dir.join("demo");
    cdtester::demo::write_examples(&demo).expect("examples");
    let sleepy = dir.join("sleepy");
    node_common::sleepy_project(&sleepy, 6, 3, 2.0);
    node_common::zip_projects(&[
        ("sleepy", sleepy),
        (FORMULA_NAME, demo.join("calc")),
        ("strs", demo.join("strs")),
    ])
}

/// Reads `GET /evaluation/{id}/events` (HTTP/1.0: the body ends when the stream closes) and
/// returns its (event, data) pairs.
async fn read_events(http: SocketAddr, id: u64) -> Vec<(String, Value)> {
    let mut conn = tokio::net::TcpStream::connect(http).await.expect("connect");
    let req =
        format!("GET /evaluation/{id}/events HTTP/1.0\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n");
    conn.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(300), conn.read_to_end(&mut raw))
        .await
        .expect("the event stream ends with the evaluation")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    let mut events = Vec::new();
    for block in body.split("\n\n") {
        let field = |k: &str| block.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
        if let (Some(event), Some(data)) = (field("event: "), field("data: ")) {
            events.push((event, serde_json::from_str(&data).expect("event data is JSON")));
        }
    }
    events
}

/// A git repository (one commit) holding the demo's `calc` project.
fn calc_repo(dir: &Path) -> String {
    for (rel, text) in
        cdtester::demo::EXAMPLES.iter().filter_map(|(p, t)| p.strip_prefix("calc/").map(|r| (r, t)))
    {
        common::write_file(dir, rel, text);
    }
    let repo = git2::Repository::init(dir).expect("git init");
    let mut index = repo.index().expect("index");
    index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).expect("git add");
    let tree = repo.find_tree(index.write_tree().expect("write tree")).expect("tree");
    let sig = git2::Signature::now("cdtester", "tests@example.com").expect("signature");
    repo.commit(Some("HEAD"), &sig, &sig, "calc", &tree, &[]).expect("commit");
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grades_metrics_events_and_roster_on_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let c =
        node_common::cluster(3, &dir.path().join("nodes"), &[("CDT_INTAKE__ALLOW_LOCAL_URLS", "true")]).await;
    let (http, other) = (c.nodes[0].http, c.nodes[1].http);

    let before = Scrape::of(http).await;
    for (name, kind) in [
        ("cdtester_tests", "counter"),
        ("cdtester_task_duration_seconds", "histogram"),
        ("cdtester_http_requests", "counter"),
        ("cdtester_failure_detections", "counter"),
        ("cdtester_elections", "counter"),
        ("cdtester_runner_errors", "counter"),
        ("cdtester_evaluations", "gauge"),
        ("cdtester_tasks", "gauge"),
        ("cdtester_projects", "gauge"),
        ("cdtester_queue_length", "gauge"),
        ("cdtester_peers_alive", "gauge"),
    ] {
        assert_eq!(
            before.families.get(name).map(String::as_str),
            Some(kind),
            "{name}: {:?}",
            before.families
        );
    }
    assert_eq!(before.sum("cdtester_peers_alive", &[]), 2.0);

    let id = node_common::submit_zip(http, &projects(dir.path())).await;
    let events = tokio::spawn(read_events(other, id));
    let watch = {
        let mut cmd = common::cdtester(&dir.path().join("watch"));
        cmd.args(["watch", &id.to_string(), "--node", &c.nodes[2].http.to_string()]);
        tokio::task::spawn_blocking(move || common::output(&mut cmd))
    };
    node_common::wait_executed(http, id, 1, Duration::from_secs(300)).await;
    let mid = Scrape::of(http).await;
    let report = node_common::wait_finished(http, id, Duration::from_secs(300)).await;
    let after = Scrape::of(http).await;

    // Counters move as the evaluation runs, and agree with the report at the end.
    let tests = |s: &Scrape| s.sum("cdtester_tests_total", &[]);
    let finished = |s: &Scrape| s.sum("cdtester_tasks", &[("state", "finished")]);
    assert!(tests(&before) < tests(&mid) && tests(&mid) < tests(&after), "tests_total did not move");
    assert!(
        finished(&before) < finished(&mid) && finished(&mid) < finished(&after),
        "finished tasks did not move"
    );
    let summary = &report["summary"];
    assert_eq!(
        after.sum("cdtester_tests_total", &[("outcome", "passed")]),
        summary["tests"]["passed"].as_f64().unwrap()
    );
    assert_eq!(
        after.sum("cdtester_tests_total", &[("outcome", "failed")]),
        summary["tests"]["failed"].as_f64().unwrap()
    );
    assert_eq!(finished(&after), summary["executed"].as_f64().unwrap());
    assert_eq!(after.sum("cdtester_task_duration_seconds_count", &[]), finished(&after));
    assert_eq!(after.sum("cdtester_task_duration_seconds_bucket", &[("le", "+Inf")]), finished(&after));
    assert_eq!(after.sum("cdtester_evaluations", &[("state", "finished")]), 1.0);
    assert_eq!(after.sum("cdtester_queue_length", &[]), 0.0);
    let polls = |s: &Scrape| {
        s.sum(
            "cdtester_http_requests_total",
            &[("route", "/evaluation/{id}"), ("method", "GET"), ("status", "200")],
        )
    };
    assert!(polls(&mid) >= 1.0 && polls(&after) > polls(&mid), "the report polls are not counted");
    // The two scrapes before this one (a scrape is counted once it is answered).
    assert_eq!(after.sum("cdtester_http_requests_total", &[("route", "/metrics")]), 2.0);

    // The event stream: reports until the evaluation finished, then `end`.
    let events = events.await.expect("event reader");
    let reports: Vec<&Value> = events.iter().filter(|(e, _)| e == "report").map(|(_, d)| d).collect();
    assert!(reports.len() >= 2, "{events:?}");
    assert!(reports.first().is_some_and(|r| r["status"] == "running"), "{events:?}");
    assert_eq!(reports.last().map(|r| r["summary"]["executed"].clone()), Some(summary["executed"].clone()));
    assert!(
        events.iter().any(|(e, d)| e == "network" && d.as_object().is_some_and(|n| n.len() == 3)),
        "{events:?}"
    );
    assert_eq!(events.last().map(|(e, _)| e.as_str()), Some("end"));
    // `cdtester watch` follows the same stream: progress lines, then the graded table.
    let out = watch.await.expect("watch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::describe(&out));
    let total = summary["executed"].as_u64().unwrap();
    assert!(stdout.lines().next().is_some_and(|l| l.starts_with("running: ")), "{stdout}");
    assert!(stdout.contains(&format!("finished: {total}/{total} modules")), "{stdout}");
    assert!(stdout.contains("overall: ") && stdout.contains(FORMULA_NAME), "{stdout}");

    check_grades(http, id, &report, dir.path()).await;
    check_roster(&c, dir.path()).await;
    check_failure_counters(c).await;
}

/// After a SIGKILL of a member, the survivors count the failure detection and one wins the
/// recovery election.
async fn check_failure_counters(mut c: cdtester::demo::LocalCluster) {
    c.kill9(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (Scrape::of(c.nodes[0].http).await, Scrape::of(c.nodes[2].http).await);
        let detected = [&a, &b].iter().all(|s| s.sum("cdtester_failure_detections_total", &[]) >= 1.0);
        let won = a.sum("cdtester_elections_total", &[("result", "won")])
            + b.sum("cdtester_elections_total", &[("result", "won")]);
        let alive = [&a, &b].iter().all(|s| s.sum("cdtester_peers_alive", &[]) == 1.0);
        if detected && won >= 1.0 && alive {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "detected {detected}, elections won {won}, alive {alive}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// grades.csv equals the report, and `cdtester grades` writes the same bytes.
async fn check_grades(http: SocketAddr, id: u64, report: &Value, dir: &Path) {
    let r = node_common::client()
        .send(Method::GET, http, &format!("/evaluation/{id}/grades.csv"), None, Duration::from_secs(30))
        .await
        .expect("grades.csv");
    assert_eq!(r.status, StatusCode::OK);
    let rows: Vec<Vec<String>> = serde_json::from_value(python_json(PARSE_CSV, &r.body)).expect("rows");
    assert_eq!(
        rows[0],
        ["project", "grade", "passed", "failed", "errors", "skipped", "status", "url", "flaky"]
    );
    let projects = report["projects"].as_object().expect("projects");
    assert_eq!(rows.len() - 1, projects.len(), "{rows:?}");
    for (row, (name, p)) in rows[1..].iter().zip(projects) {
        let shown = if name.starts_with(['=', '+', '-', '@']) { format!("'{name}") } else { name.clone() };
        assert_eq!(row[0], shown);
        let grade: f64 = row[1].parse().unwrap_or_else(|_| panic!("{name}: grade {:?}", row[1]));
        assert_eq!(Some(grade), p["grade"].as_f64(), "{name}");
        let n = |k: &str| p["tests"][k].as_u64().unwrap_or(0);
        let cell =
            |i: usize| row[i].parse::<u64>().unwrap_or_else(|_| panic!("{name}: column {i} {:?}", row[i]));
        assert_eq!(cell(2), p["total_passed"].as_u64().unwrap(), "{name} passed");
        assert_eq!(cell(3) + cell(4), p["total_failed"].as_u64().unwrap(), "{name} failed + errors");
        assert_eq!(cell(4), n("error"), "{name} errors");
        assert_eq!(cell(5), n("skipped") + n("xfailed"), "{name} skipped");
        assert_eq!(row[6], p["status"].as_str().unwrap());
        assert_eq!(row[7], p["url"].as_str().unwrap_or(""));
        assert_eq!(cell(8), n("flaky"), "{name} flaky");
    }
    assert!(projects.contains_key(FORMULA_NAME), "{projects:?}");

    let file = dir.join("grades.csv");
    let out = common::output(common::cdtester(&dir.join("cli")).args([
        "grades",
        &id.to_string(),
        "--node",
        &http.to_string(),
        "--csv",
        file.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{}", common::describe(&out));
    assert_eq!(std::fs::read(&file).expect("CSV written"), r.body.to_vec());
    let out = common::output(common::cdtester(&dir.join("cli")).args([
        "grades",
        "999999",
        "--node",
        &http.to_string(),
    ]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("404"),
        "{}",
        common::describe(&out)
    );
}

/// `cdtester submit --roster` names each project after its student; the JSON form too, and
/// names that could not name a project are refused.
async fn check_roster(c: &cdtester::demo::LocalCluster, dir: &Path) {
    let http = c.nodes[2].http;
    let (a, b) = (calc_repo(&dir.join("git/a")), calc_repo(&dir.join("git/b")));
    let roster = dir.join("roster.csv");
    std::fs::write(&roster, format!("student,repository\nAlice Martin,{a}\n\"Bob, Jr\",{b}\n")).unwrap();
    let out = common::output(common::cdtester(&dir.join("cli")).args([
        "submit",
        "--roster",
        roster.to_str().unwrap(),
        "--node",
        &http.to_string(),
        "--wait",
        "--json",
    ]));
    assert!(out.status.success(), "{}", common::describe(&out));
    let report = common::run_json(&out);
    let names: Vec<&String> = report["projects"].as_object().expect("projects").keys().collect();
    assert_eq!(names, ["Alice Martin", "Bob, Jr"], "{report}");
    assert_eq!(report["projects"]["Alice Martin"]["url"].as_str(), Some(a.as_str()));
    assert_eq!(report["projects"]["Bob, Jr"]["url"].as_str(), Some(b.as_str()));
    assert_eq!(report["projects"]["Alice Martin"]["status"], "finished", "{report}");

    let body = serde_json::json!({"projects": [a, {"name": "carol", "url": b}]});
    let (s, v) = node_common::call(
        http,
        Method::POST,
        "/evaluation",
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["eval_id"].as_u64().expect("eval id");
    let (_, r) = node_common::get(http, &format!("/evaluation/{id}?tests=false")).await;
    let names: Vec<&String> = r["projects"].as_object().expect("projects").keys().collect();
    assert_eq!(names, ["a", "carol"], "{r}");
    for bad in ["../x", "a/b", "", "tab\there"] {
        let body = serde_json::json!({"projects": [{"name": bad, "url": a}]});
        let (s, v) = node_common::call(
            http,
            Method::POST,
            "/evaluation",
            Some(("application/json", body.to_string().into_bytes())),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad:?}: {v}");
    }
    let body = serde_json::json!({"projects": [{"name": "x", "url": a, "extra": 1}]});
    let (s, _) = node_common::call(
        http,
        Method::POST,
        "/evaluation",
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
