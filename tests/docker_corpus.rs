//! Corpus projects in the docker runner give the per-module counts plain pytest gives each module
//! run alone: a flat project, tests inside the package (`*_test.py`), a `test/` folder without
//! `__init__.py`, and a src layout that must be installed (built offline in a sandbox).
//!
//! Not used here: six, whose counts depend on the interpreter's optional modules (the corpus was
//! measured with a CPython that has tkinter; Debian's python3 in the image has none, so 14 more
//! tests skip there: an environment difference, not a runner one).

mod common;
mod docker_common;

use std::collections::BTreeMap;

use cdtester::corpus::{self, ExpectedCounts};
use cdtester_runner_api::{Counts, Limits, ProjectSource, Runner, TaskSpec};
use docker_common::{containers_of, engine_available, node_id, python, runner};

const PROJECTS: &[&str] = &["toml", "colorama", "tabulate", "cachetools"];

#[test]
fn corpus_modules_count_the_same_in_containers() {
    if !engine_available("corpus_modules_count_the_same_in_containers") {
        return;
    }
    let all = corpus::shipped().expect("corpus manifest");
    let dir = tempfile::tempdir().expect("tempdir");
    let node = node_id("corpus");
    let runner = runner(&node, dir.path(), Limits::default());
    for name in PROJECTS {
        let p = all.iter().find(|p| p.name == *name).unwrap_or_else(|| panic!("{name} in the corpus"));
        let sdist = corpus::fetch(p, &python(), &common::corpus_cache()).unwrap_or_else(|e| panic!("{e}"));
        let root = corpus::unpack(p, &sdist, &dir.path().join("src")).unwrap_or_else(|e| panic!("{e}"));
        let source = ProjectSource {
            id: p.name.clone(),
            name: p.name.clone(),
            root,
            extra_requirements: p.test_deps.clone(),
        };
        let project = runner.prepare(&source).unwrap_or_else(|e| panic!("{name}: prepare: {e}"));
        let modules = runner.discover(&project).unwrap_or_else(|e| panic!("{name}: discover: {e}"));
        let expected = p.expected_alone();
        assert_eq!(modules, expected.keys().cloned().collect::<Vec<_>>(), "{name}: discovered modules");
        // Two tasks, so that the container is reused across tasks as well as within one.
        let (first, second) = modules.split_at(modules.len() / 2);
        let mut got: BTreeMap<String, ExpectedCounts> = BTreeMap::new();
        for (i, part) in [first, second].iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let task = TaskSpec::new(format!("{name}-{i}"), part.to_vec());
            let report = runner
                .run(&project, &task, &Limits::default())
                .unwrap_or_else(|e| panic!("{name}: run: {e}"));
            for m in report.modules {
                got.insert(m.module.clone(), ExpectedCounts::of(&m.counts()));
            }
        }
        assert_eq!(got, expected, "{name}: per-module counts in the container");
        runner.release(&project);
    }
    drop(runner);
    assert!(containers_of(&node).is_empty(), "no container of ours may remain");
}

/// The whole path through the binary: `cdtester run --json` with `runner.default = "docker"`
/// selects the docker runner from the registry, counts like plain pytest, and leaves no container
/// behind when it exits.
#[test]
fn cdtester_run_uses_the_docker_runner_and_cleans_up() {
    if !engine_available("cdtester_run_uses_the_docker_runner_and_cleans_up") {
        return;
    }
    let all = corpus::shipped().expect("corpus manifest");
    let p = all.iter().find(|p| p.name == "colorama").expect("colorama in the corpus");
    let dir = tempfile::tempdir().expect("tempdir");
    let sdist = corpus::fetch(p, &python(), &common::corpus_cache()).unwrap_or_else(|e| panic!("{e}"));
    let root = corpus::unpack(p, &sdist, &dir.path().join("src")).unwrap_or_else(|e| panic!("{e}"));
    let bind = format!("127.0.0.1:{}", 40000 + std::process::id() % 20000);
    let out = common::output(
        common::cdtester(&dir.path().join("data"))
            .args(["run", root.to_str().expect("utf-8 path"), "--json"])
            .env("CDT_RUNNER__DEFAULT", "docker")
            .env("CDT_NODE__BIND", &bind),
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    let eval = common::run_json(&out);
    let modules =
        common::first_project(&eval)["modules"].as_object().unwrap_or_else(|| panic!("modules in {eval:#}"));
    let got: BTreeMap<String, ExpectedCounts> = modules
        .iter()
        .map(|(name, m)| {
            let c: Counts = serde_json::from_value(m["counts"].clone()).expect("module counts");
            (name.clone(), ExpectedCounts::of(&c))
        })
        .collect();
    assert_eq!(got, p.expected_alone(), "colorama through `cdtester run` in containers");
    assert!(containers_of(&bind).is_empty(), "the process's containers must be gone when it exits");
}
