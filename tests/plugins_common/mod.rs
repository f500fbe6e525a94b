//! Helpers shared by the plugins_* end-to-end tests: build the example plugins from source.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("node/ has a parent").to_path_buf()
}

/// The C example policies, built by plugins/examples/wasm/build.sh (clang + lld), once per
/// test process.
pub fn wasm_examples() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("plugins-wasm-{}", std::process::id()));
        let status = Command::new("bash")
            .arg(repo_root().join("plugins/examples/wasm/build.sh"))
            .arg(&dir)
            .status()
            .expect("running bash");
        assert!(status.success(), "building the example policies failed: they need clang and lld");
        dir
    })
}

/// A test-only WAT policy from plugins/examples/wasm/test.
pub fn test_wat(name: &str) -> PathBuf {
    repo_root().join("plugins/examples/wasm/test").join(name)
}

/// The example native runner plugin (cdylib), built with cargo into its own target directory
/// (the outer build does not produce cdylib artifacts for tests), once per test process.
pub fn unittest_plugin() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unittest-plugin");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "cdtester-unittest-runner", "--target-dir"])
            .arg(&target)
            .current_dir(repo_root())
            .status()
            .expect("running cargo");
        assert!(status.success(), "building plugins/examples/unittest-runner failed");
        target.join("debug/libcdtester_unittest_runner.so")
    })
}

/// A `[[plugins.wasm]]` config entry.
pub fn wasm_entry(name: &str, path: &Path, sha256: &str) -> String {
    format!("[[plugins.wasm]]\nname = \"{name}\"\npath = \"{}\"\nsha256 = \"{sha256}\"\n", path.display())
}

/// The `[[plugins.native]]` entry of the `unittest` runner library at `lib`, pinned to its sha256.
pub fn unittest_entry(lib: &Path) -> String {
    format!(
        "[[plugins.native]]\nname = \"unittest\"\npath = \"{}\"\nsha256 = \"{}\"\n",
        lib.display(),
        sha256_file(lib)
    )
}

pub fn sha256_file(path: &Path) -> String {
    cdtester_runner_api::sha256_hex(&std::fs::read(path).expect("reading a plugin file"))
}

/// Writes `files` (relative path, contents) under `root`.
pub fn write_files(root: &Path, files: &[(&str, &str)]) {
    for (path, text) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("file has a parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
}

/// A small unittest project: core tests weigh 3 and extra tests 0.5 under the weighted-grade
/// example policy. Verdicts: core_add passed, core_sub failed, extra_pow passed, plain passed,
/// skipped skipped, broken error.
pub const GRADED_PROJECT: &[(&str, &str)] = &[
    ("calc.py", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a + b  # bug\n"),
    ("tests/__init__.py", ""),
    (
        "tests/test_calc.py",
        r#"import unittest
from calc import add, sub

class TestCalc(unittest.TestCase):
    def test_core_add(self):
        self.assertEqual(add(2, 3), 5)
    def test_core_sub(self):
        self.assertEqual(sub(5, 3), 2)
    def test_extra_pow(self):
        self.assertEqual(2 ** 10, 1024)
    def test_plain(self):
        self.assertTrue(True)
    @unittest.skip("later")
    def test_skipped(self):
        pass
    def test_broken(self):
        {}["missing"]
"#,
    ),
];

/// Incompressible bytes (so the zip is really over 5 MiB and no zip-bomb check trips).
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
