//! End-to-end: real corpus projects (pinned sdists, sha256 checked) through the real
//! `cdtester run --json` binary; every module's counts must equal the corpus's run-alone
//! expectation (`separate_module_runs.per_module`).

mod common;

use std::collections::BTreeMap;

use cdtester::corpus::{CorpusProject, ExpectedCounts};
use cdtester_runner_api::Counts;
use common::{cdtester, corpus_run, describe, fetch_corpus, output, run_json};

/// toml (2 failures), colorama (skips, `*_test.py`, tests in the package), simplejson (33
/// in-package modules, skips), attrs (install + hypothesis, failure, xfail, module-level skip),
/// six, tabulate (optional-dependency skips, `test/` without `__init__`).
const PROJECTS: &[&str] = &["toml", "colorama", "simplejson", "attrs", "six", "tabulate"];

fn counts_of(module: &serde_json::Value) -> ExpectedCounts {
    let c: Counts = serde_json::from_value(module["counts"].clone()).expect("module counts");
    assert_eq!(c.timeout + c.crashed + c.oom + c.infra_error, 0, "unexpected verdicts in {module}");
    ExpectedCounts::of(&c)
}

fn assert_matches_corpus(projects: &[CorpusProject], eval: &serde_json::Value) {
    let results = eval["projects"].as_object().expect("projects by name");
    assert_eq!(results.len(), projects.len(), "one result per project:\n{eval:#}");
    for p in projects {
        let r = results.get(&p.project_root).unwrap_or_else(|| panic!("{} missing", p.name));
        assert!(r.get("error").is_none(), "{}: {}", p.name, r["error"]);
        let got: BTreeMap<String, ExpectedCounts> = r["modules"]
            .as_object()
            .expect("modules")
            .iter()
            .map(|(name, m)| (name.clone(), counts_of(m)))
            .collect();
        assert_eq!(got, p.expected_alone(), "{}: per-module counts differ from the corpus", p.name);
    }
}

#[test]
fn corpus_projects_count_exactly_like_pytest_run_alone() {
    let work = tempfile::tempdir().expect("tempdir");
    // All projects in one run (the folder holds one project per top-level folder).
    let run = corpus_run(PROJECTS, work.path(), "junit");
    let (projects, junit) = (&run.projects, &run.junit);
    let eval = run_json(&run.out);
    assert_matches_corpus(projects, &eval);

    // The JUnit file is well-formed and has one testcase per result.
    let total = eval["summary"]["tests"]
        .as_object()
        .expect("counts")
        .values()
        .map(|v| v.as_u64().unwrap_or(0))
        .sum::<u64>();
    let xml = std::fs::read_to_string(junit).expect("junit file");
    assert_eq!(xml.matches("<testcase ").count() as u64, total);
    let check = output(
        std::process::Command::new("python3")
            .args(["-c", "import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); print(len(r.findall('testsuite')))"])
            .arg(junit),
    );
    assert!(check.status.success(), "JUnit XML does not parse: {}", describe(&check));
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), projects.len().to_string());
}

#[test]
fn fresh_interpreters_count_the_same_as_the_warm_worker() {
    let work = tempfile::tempdir().expect("tempdir");
    let projects_dir = work.path().join("projects");
    let projects = fetch_corpus(&["toml", "colorama"], &projects_dir);
    let out = output(
        cdtester(&work.path().join("data"))
            .env("CDT_RUNNER__LOCAL__WARM", "false")
            .args(["run", "--json"])
            .arg(&projects_dir),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_matches_corpus(&projects, &run_json(&out));
}
