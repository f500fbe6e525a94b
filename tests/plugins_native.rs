//! Native runner plugins end to end: the example `unittest` runner (a cdylib built from
//! plugins/examples/unittest-runner) loaded through the C ABI gives correct per-test results;
//! wrong sha256 pins, ABI versions, missing symbols and misnamed runners are refused at load.

mod plugins_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdtester_config::NativePluginConfig;
use cdtester_plugins::{NativeError, load_native_runner};
use cdtester_runner_api::{Limits, Outcome, ProjectSource, Runner, RunnerError, TaskSpec};
use plugins_common::*;

fn pinned(name: &str, path: &Path) -> NativePluginConfig {
    NativePluginConfig { name: name.into(), path: path.into(), sha256: sha256_file(path) }
}

#[test]
fn unittest_plugin_reports_correct_per_test_results() {
    let runner = load_native_runner(&pinned("unittest", unittest_plugin())).unwrap();
    assert_eq!(runner.name(), "unittest");
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), GRADED_PROJECT);
    write_files(
        dir.path(),
        &[(
            "tests/test_more.py",
            "import unittest\n\n@unittest.skip('whole class')\nclass TestLater(unittest.TestCase):\n    def test_a(self):\n        pass\n\nclass TestX(unittest.TestCase):\n    @unittest.expectedFailure\n    def test_known_bug(self):\n        self.assertEqual(1, 2)\n",
        )],
    );
    let source = ProjectSource {
        id: "p1".into(),
        name: "calc".into(),
        root: dir.path().into(),
        extra_requirements: vec![],
    };
    let prepared = runner.prepare(&source).unwrap();
    let modules = runner.discover(&prepared).unwrap();
    assert_eq!(modules, vec!["tests/test_calc.py", "tests/test_more.py"]);
    let report = runner.run(&prepared, &TaskSpec::new("t", modules), &Limits::default()).unwrap();
    assert_eq!(report.modules.len(), 2);
    let got: BTreeMap<String, Outcome> =
        report.modules.iter().flat_map(|m| m.tests.iter()).map(|t| (t.nodeid.clone(), t.outcome)).collect();
    let want: BTreeMap<String, Outcome> = [
        ("tests/test_calc.py::TestCalc::test_broken", Outcome::Error),
        ("tests/test_calc.py::TestCalc::test_core_add", Outcome::Passed),
        ("tests/test_calc.py::TestCalc::test_core_sub", Outcome::Failed),
        ("tests/test_calc.py::TestCalc::test_extra_pow", Outcome::Passed),
        ("tests/test_calc.py::TestCalc::test_plain", Outcome::Passed),
        ("tests/test_calc.py::TestCalc::test_skipped", Outcome::Skipped),
        ("tests/test_more.py::TestLater::test_a", Outcome::Skipped),
        ("tests/test_more.py::TestX::test_known_bug", Outcome::Xfailed),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);
    let failed = report.modules[0].tests.iter().find(|t| t.outcome == Outcome::Failed).unwrap();
    assert_eq!(failed.message.as_deref(), Some("AssertionError: 8 != 2"));
    let c = report.modules[0].counts();
    assert_eq!((c.passed, c.failed, c.error, c.skipped), (3, 1, 1, 1));

    // Errors cross the boundary typed.
    let empty = tempfile::tempdir().unwrap();
    let source = ProjectSource { root: empty.path().into(), ..source };
    let prepared = runner.prepare(&source).unwrap();
    assert!(matches!(runner.discover(&prepared), Err(RunnerError::NoTests)));
}

/// A C library exporting `cdt_runner_abi_version` returning `version` (and nothing else).
fn c_plugin(dir: &Path, version: u32) -> PathBuf {
    let src = dir.join(format!("v{version}.c"));
    std::fs::write(&src, format!("unsigned int cdt_runner_abi_version(void) {{ return {version}; }}\n"))
        .unwrap();
    let lib = dir.join(format!("libv{version}.so"));
    let status = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(&src).status().unwrap();
    assert!(status.success());
    lib
}

#[test]
fn bad_native_plugins_are_refused_at_load_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = c_plugin(dir.path(), 2);
    let err = load_native_runner(&pinned("future", &v2)).unwrap_err();
    assert!(matches!(err, NativeError::AbiVersion { found: 2, .. }));
    assert!(
        err.to_string().contains("speaks runner ABI v2, this host speaks v1: refusing to use it"),
        "{err}"
    );

    let v1 = c_plugin(dir.path(), 1);
    let err = load_native_runner(&pinned("partial", &v1)).unwrap_err();
    assert!(
        err.to_string().contains("does not export cdt_runner_call: not a cdtester runner plugin"),
        "{err}"
    );

    let lib = unittest_plugin();
    let mut cfg = pinned("unittest", lib);
    cfg.sha256 = "0".repeat(64);
    let err = load_native_runner(&cfg).unwrap_err();
    assert!(matches!(err, NativeError::Pin { .. }));
    assert!(
        err.to_string().contains(&format!("has sha256 {}, but the configuration pins 000", sha256_file(lib))),
        "{err}"
    );

    let err = load_native_runner(&pinned("pytest", lib)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "runner plugin pytest: its runner calls itself \"unittest\"; the configuration must use that name"
    );

    let not_a_library = dir.path().join("junk.so");
    std::fs::write(&not_a_library, b"junk").unwrap();
    let err = load_native_runner(&pinned("junk", &not_a_library)).unwrap_err();
    assert!(matches!(err, NativeError::Load { .. }), "{err}");
}
