//! `cdtester run` is the node's engine with one local member and no network: for real corpus
//! projects (pinned sdists), the report of the real `cdtester run --json` binary and that of a
//! real one-node network (`cdtester node`, then `cdtester submit --wait --json`) are identical
//! per project, module and test (statuses, runners, grades, counts, outcomes; not times), both
//! equal the corpus's run-alone counts, and both JUnit files are identical but for their times.

mod common;
mod node_common;

use std::collections::BTreeMap;
use std::path::Path;

use cdtester::corpus::ExpectedCounts;
use cdtester::eval::{EvalReport, ModuleStatus, ProjectStatus};
use cdtester_runner_api::Counts;
use common::{cdtester, corpus_run, describe, output};

/// toml (failures), colorama (skips, tests inside the package), six (one big module), tabulate
/// (optional-dependency skips, `test/` without `__init__`).
const PROJECTS: &[&str] = &["toml", "colorama", "six", "tabulate"];

/// What must agree about a module: status, counts and each test's outcome.
type ModuleShape = (ModuleStatus, Counts, Vec<(String, String)>);

/// What must agree about a project (everything but times and the nodes' addresses).
#[derive(Debug, PartialEq)]
struct ProjectShape {
    status: ProjectStatus,
    runner: Option<String>,
    error: Option<String>,
    grade: Option<f64>,
    tests: Counts,
    executed: (u64, u64, u64),
    modules: BTreeMap<String, ModuleShape>,
}

fn shape(r: &EvalReport) -> BTreeMap<String, ProjectShape> {
    r.projects
        .iter()
        .map(|(name, p)| {
            let modules = p
                .modules
                .iter()
                .map(|(m, v)| {
                    let mut tests: Vec<(String, String)> =
                        v.tests.iter().flatten().map(|t| (t.nodeid.clone(), t.outcome.to_string())).collect();
                    tests.sort();
                    (m.clone(), (v.status, v.counts, tests))
                })
                .collect();
            let shape = ProjectShape {
                status: p.status,
                runner: p.runner.clone(),
                error: p.error.clone(),
                grade: p.grade,
                tests: p.tests,
                executed: (p.executed, p.executing, p.pending),
                modules,
            };
            (name.clone(), shape)
        })
        .collect()
}

/// JUnit XML without its `time="..."` attributes.
fn without_times(xml: &str) -> String {
    let mut out = String::new();
    let mut rest = xml;
    while let Some(i) = rest.find(" time=\"") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 7..];
        rest = after.find('"').map_or("", |j| &after[j + 1..]);
    }
    out.push_str(rest);
    out
}

fn report_of(out: &std::process::Output) -> EvalReport {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not a report ({e}):\n{}", describe(out)))
}

fn junit(path: &Path) -> String {
    without_times(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[tokio::test(flavor = "multi_thread")]
async fn run_and_a_one_node_network_give_identical_reports() {
    let work = tempfile::tempdir().expect("tempdir");
    // `cdtester run`: one process, no network (2 worker slots by default).
    let run = corpus_run(PROJECTS, work.path(), "run");
    let (projects_dir, config, projects) = (&run.dir, &run.config, &run.projects);
    let local = report_of(&run.out);

    // A one-node network, the same configuration, the same folder submitted by the client.
    let config_path = config.to_string_lossy().into_owned();
    let cluster = node_common::cluster(
        1,
        &work.path().join("cluster"),
        &[("CDT_CONFIG", config_path.as_str()), ("CDT_RUNNER__WORKERS", "2")],
    )
    .await;
    let node_junit = work.path().join("node.xml");
    let http = cluster.nodes[0].http.to_string();
    let out = output(
        cdtester(&work.path().join("client-data"))
            .args(["submit", "--wait", "--json", "--node", &http, "--junit-xml"])
            .arg(&node_junit)
            .arg(projects_dir),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let networked = report_of(&out);

    assert_eq!(shape(&local), shape(&networked), "cdtester run and a one-node network disagree");
    assert_eq!(
        (local.summary.grade, local.summary.tests, local.summary.executed),
        (networked.summary.grade, networked.summary.tests, networked.summary.executed)
    );
    assert_eq!(junit(&run.junit), junit(&node_junit), "the JUnit files differ but for their times");

    // And both are right: every module counts what the corpus says pytest counts run alone.
    assert_eq!(local.projects.len(), projects.len());
    for p in projects {
        let got = local.projects.get(&p.project_root).unwrap_or_else(|| panic!("{} missing", p.name));
        assert_eq!(got.status, ProjectStatus::Finished, "{}: {:?}", p.name, got.error);
        let counts: BTreeMap<String, ExpectedCounts> =
            got.modules.iter().map(|(m, v)| (m.clone(), ExpectedCounts::of(&v.counts))).collect();
        assert_eq!(counts, p.expected_alone(), "{}: per-module counts differ from the corpus", p.name);
    }
}

/// Inodes of the sockets process `pid` holds now.
fn socket_inodes(pid: u32) -> Vec<String> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).map(str::to_string)
        })
        .collect()
}

/// The TCP and UDP sockets (IPv4 and IPv6) among `inodes`, as `/proc/net` rows.
fn inet_sockets(pid: u32, inodes: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for row in text.lines().skip(1) {
            // Field 10 (from 0) is the socket's inode.
            if row.split_whitespace().nth(9).is_some_and(|inode| inodes.iter().any(|i| i == inode)) {
                found.push(format!("{table}: {row}"));
            }
        }
    }
    found
}

#[test]
fn cdtester_run_opens_no_network_socket() {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("sleepy");
    node_common::sleepy_project(&project, 2, 3, 1.5);
    let mut child = cdtester(&work.path().join("data"))
        .args(["run", "--json"])
        .arg(&project)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start cdtester run");
    let pid = child.id();
    let mut looked = 0;
    while child.try_wait().expect("wait").is_none() {
        let inodes = socket_inodes(pid);
        let inet = inet_sockets(pid, &inodes);
        assert!(inet.is_empty(), "cdtester run holds network sockets: {inet:?}");
        looked += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("cdtester run");
    assert!(out.status.success(), "{}", describe(&out));
    assert!(looked > 10, "the run ended before it could be watched");
    let report = report_of(&out);
    assert_eq!(report.projects["sleepy"].status, ProjectStatus::Finished, "{}", describe(&out));
}
