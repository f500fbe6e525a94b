//! WASM policy plugins end to end: the C example policies built from source, pinned in a TOML
//! config loaded by figment, applied to a real evaluation run by the native `unittest` runner
//! plugin; misbehaving plugins stopped, refused or ignored with the fallback applied.

mod plugins_common;

use std::path::Path;
use std::time::{Duration, Instant};

use cdtester_config::Config;
use cdtester_plugins::{
    Admission, CallFailure, PolicyError, PolicySet, ProjectMeta, RunnerChoice, load_native_runner,
};
use cdtester_runner_api::{Outcome, ProjectSource, Runner, TaskSpec, TestResult};
use plugins_common::*;

/// A config with the three example policies, the test-only ones and the native runner.
fn config(dir: &Path, extra: &str) -> Config {
    let wasm = wasm_examples();
    let entry = |name: &str, path: &Path| wasm_entry(name, path, &sha256_file(path));
    let lib = unittest_plugin();
    let toml = format!(
        r#"[runner]
default = "unittest"

[[projects]]
pattern = "*"
policies = ["max-size", "untrusted-to-docker", "weighted-grade"]

{}{}{}{}{}
{}{extra}"#,
        entry("untrusted-to-docker", &wasm.join("untrusted_to_docker.wasm")),
        entry("max-size", &wasm.join("max_size.wasm")),
        entry("weighted-grade", &wasm.join("weighted_grade.wasm")),
        entry("loop", &test_wat("loop.wat")),
        entry("memhog", &test_wat("memhog.wat")),
        unittest_entry(lib),
    );
    let file = dir.join("cdtester.toml");
    std::fs::write(&file, toml).unwrap();
    Config::load(Some(&file)).unwrap()
}

struct Evaluation {
    admission: Admission,
    choice: RunnerChoice,
    tests: Vec<TestResult>,
    grade: Option<f64>,
}

/// What the node does for one project: admission, runner choice, run every module with the
/// chosen runner (only `unittest` is available here), grade.
fn evaluate(
    policies: &PolicySet,
    config: &Config,
    runner: &dyn Runner,
    root: &Path,
    url: Option<&str>,
) -> Evaluation {
    let settings = config.project_settings("calc", url);
    let meta = ProjectMeta::from_dir("calc", url, root).unwrap();
    let admission = policies.admit(&settings.policies, &meta).value;
    let configured = RunnerChoice { runner: settings.runner.clone(), limits: settings.limits.clone() };
    let choice = policies.select_runner(&settings.policies, &meta, configured).value;
    let mut tests = Vec::new();
    if admission == Admission::Accept && choice.runner == runner.name() {
        let source = ProjectSource {
            id: "1".into(),
            name: "calc".into(),
            root: root.into(),
            extra_requirements: vec![],
        };
        let prepared = runner.prepare(&source).unwrap();
        let modules = runner.discover(&prepared).unwrap();
        let report = runner.run(&prepared, &TaskSpec::new("t1", modules), &choice.limits).unwrap();
        tests = report.modules.into_iter().flat_map(|m| m.tests).collect();
    }
    let grade = policies.grade(&settings.policies, "calc", &tests).value;
    Evaluation { admission, choice, tests, grade }
}

#[test]
fn example_policies_change_a_real_evaluation_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let policies = PolicySet::load(&cfg.plugins).unwrap();
    let runner = load_native_runner(&cfg.plugins.native[0]).unwrap();
    let project = dir.path().join("calc");
    write_files(&project, GRADED_PROJECT);

    // Trusted source: configured runner, weighted grade instead of the default.
    let e = evaluate(&policies, &cfg, &runner, &project, Some("file:///srv/calc.git"));
    assert_eq!(e.admission, Admission::Accept);
    assert_eq!(e.choice.runner, "unittest");
    assert_eq!(e.choice.limits, cfg.runner.limits);
    let verdict = |name: &str| e.tests.iter().find(|t| t.nodeid.ends_with(name)).map(|t| t.outcome);
    assert_eq!(verdict("::test_core_add"), Some(Outcome::Passed));
    assert_eq!(verdict("::test_core_sub"), Some(Outcome::Failed));
    assert_eq!(verdict("::test_broken"), Some(Outcome::Error));
    assert_eq!(verdict("::test_skipped"), Some(Outcome::Skipped));
    // passed weights 3 + 0.5 + 1, graded 3 + 3 + 0.5 + 1 + 1: 20 * 4.5 / 8.5
    assert_eq!(e.grade, Some(10.59));
    let plain = policies.grade(&[], "calc", &e.tests).value;
    assert_eq!(plain, Some(12.0), "the default grade: 3 passed of 5 graded");

    // Untrusted URL: docker with the policy's tighter limits (not run: no docker engine here).
    let e = evaluate(&policies, &cfg, &runner, &project, Some("https://github.com/someone/calc"));
    assert_eq!(e.choice.runner, "docker");
    assert_eq!((e.choice.limits.timeout_s, e.choice.limits.memory_mb, e.choice.limits.pids), (60, 512, 128));
    assert_eq!(e.choice.limits.cpus, cfg.runner.limits.cpus, "unset limits keep the configured value");

    // Over 5 MiB: rejected with the policy's reason, nothing runs, nothing to grade.
    std::fs::write(project.join("data.bin"), vec![0u8; 6 * 1024 * 1024]).unwrap();
    let e = evaluate(&policies, &cfg, &runner, &project, None);
    match &e.admission {
        Admission::Reject { reason } => assert_eq!(reason, "project is 6.00 MiB, over the 5 MiB limit"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(e.tests.is_empty());
    assert_eq!(e.grade, None);
}

#[test]
fn a_looping_policy_is_stopped_and_the_host_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let policies = PolicySet::load(&cfg.plugins).unwrap();
    let tests = vec![TestResult {
        nodeid: "t.py::test_core_x".into(),
        outcome: Outcome::Passed,
        duration: 0.1,
        message: None,
        attempts: Vec::new(),
    }];
    for _ in 0..3 {
        let start = Instant::now();
        let d = policies.grade(&["loop".into(), "weighted-grade".into()], "p", &tests);
        assert!(start.elapsed() < Duration::from_secs(2), "stopped within the 1 s deadline");
        assert!(
            matches!(
                &d.errors[..],
                [PolicyError::Call {
                    failure: CallFailure::OutOfFuel { .. } | CallFailure::Deadline { .. },
                    ..
                }]
            ),
            "{:?}",
            d.errors
        );
        assert_eq!((d.value, d.decided_by.as_deref()), (Some(20.0), Some("weighted-grade")));
    }
    // The memory hog traps at its 16 MiB cap; the default grade applies.
    let d = policies.grade(&["memhog".into()], "p", &tests);
    assert_eq!(d.errors.len(), 1);
    assert!(
        d.errors[0].to_string().ends_with("asked for more than its 16 MiB memory cap: stopped"),
        "{}",
        d.errors[0]
    );
    assert_eq!((d.value, d.decided_by), (Some(20.0), None));
}

#[test]
fn wrong_abi_and_wrong_sha256_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let wrong_abi = test_wat("wrong_abi.wat");
    let toml = wasm_entry("future", &wrong_abi, &sha256_file(&wrong_abi));
    std::fs::write(dir.path().join("a.toml"), toml).unwrap();
    let cfg = Config::load(Some(&dir.path().join("a.toml"))).unwrap();
    let err = PolicySet::load(&cfg.plugins).unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy plugin future: speaks policy ABI v2, this host speaks v1: refusing to load it"
    );

    let good = wasm_examples().join("max_size.wasm");
    let toml = wasm_entry("max-size", &good, &"ab".repeat(32));
    std::fs::write(dir.path().join("b.toml"), toml).unwrap();
    let cfg = Config::load(Some(&dir.path().join("b.toml"))).unwrap();
    let err = PolicySet::load(&cfg.plugins).unwrap_err().to_string();
    assert!(err.starts_with("policy plugin max-size: plugin file "), "{err}");
    assert!(
        err.contains(&format!(
            "has sha256 {}, but the configuration pins {}",
            sha256_file(&good),
            "ab".repeat(32)
        )),
        "{err}"
    );
}
