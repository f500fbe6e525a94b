//! End-to-end: `cdtester run` on bad input gives a clear message or a per-test verdict, never a
//! panic or a hang.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{cdtester, describe, first_project, output, run_json, write_file};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_no_panic(out: &std::process::Output) {
    assert!(!stderr(out).contains("panicked"), "{}", describe(out));
}

fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let file = std::fs::File::create(path).expect("create zip");
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        zip.start_file(*name, opts).expect("zip entry");
        zip.write_all(data).expect("zip data");
    }
    zip.finish().expect("finish zip");
}

#[test]
fn missing_path_is_a_usage_error() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = output(cdtester(&work.path().join("data")).args(["run"]).arg(work.path().join("nope")));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("no such file or folder"), "{}", describe(&out));
    assert_no_panic(&out);
}

#[test]
fn zip_slip_is_refused_and_nothing_escapes() {
    let work = tempfile::tempdir().expect("tempdir");
    let zip = work.path().join("slip.zip");
    write_zip(&zip, &[("p/tests/test_a.py", b"def test_a():\n    pass\n"), ("../../escaped.py", b"x = 1\n")]);
    let out = output(cdtester(&work.path().join("data")).args(["run"]).arg(&zip));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("zip-slip"), "{}", describe(&out));
    assert!(!work.path().join("escaped.py").exists() && !Path::new("/tmp/escaped.py").exists());
    assert_no_panic(&out);
}

#[test]
fn zip_bomb_over_the_size_cap_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let zip = work.path().join("bomb.zip");
    // 600 MiB of zeros (over the 512 MiB cap) compresses to well under 1 MiB; Python's zlib makes
    // it in a second or two.
    let made = output(
        std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile\n\
                 with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
                 \x20   with z.open('p/bomb.bin', 'w', force_zip64=True) as f:\n\
                 \x20       block = bytes(1 << 20)\n\
                 \x20       for _ in range(600): f.write(block)\n",
            ])
            .arg(&zip),
    );
    assert!(made.status.success(), "{}", describe(&made));
    assert!(std::fs::metadata(&zip).expect("zip").len() < 8 << 20);
    let out = output(cdtester(&work.path().join("data")).args(["run"]).arg(&zip));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("zip bomb"), "{}", describe(&out));
    assert_no_panic(&out);
}

#[test]
fn project_without_tests_is_reported() {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("empty");
    write_file(&project, "pyproject.toml", "[project]\nname = 'empty'\nversion = '0'\n");
    write_file(&project, "empty/__init__.py", "def f():\n    return 1\n");
    let out = output(cdtester(&work.path().join("data")).args(["run", "--json"]).arg(&project));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let eval = run_json(&out);
    let error = first_project(&eval)["error"].as_str().unwrap_or_default();
    assert!(error.contains("no test modules"), "{eval:#}");
    assert_no_panic(&out);
}

/// A project whose modules hang, die in three ways, fail to import, and one that is fine.
fn hostile_project(root: &Path) {
    write_file(
        root,
        "tests/test_ok.py",
        "def test_one():\n    assert 1 + 1 == 2\n\ndef test_two():\n    assert 'a' in 'abc'\n",
    );
    write_file(
        root,
        "tests/test_hang.py",
        "import time\n\ndef test_before():\n    pass\n\ndef test_forever():\n    time.sleep(10_000)\n\ndef test_after():\n    pass\n",
    );
    write_file(
        root,
        "tests/test_kill.py",
        "import os, signal\n\ndef test_before():\n    pass\n\ndef test_kill():\n    os.kill(os.getpid(), signal.SIGKILL)\n\ndef test_after():\n    pass\n",
    );
    write_file(
        root,
        "tests/test_exit.py",
        "import os\n\ndef test_before():\n    pass\n\ndef test_exit():\n    os._exit(0)\n",
    );
    write_file(root, "tests/test_segv.py", "import ctypes\n\ndef test_segv():\n    ctypes.string_at(0)\n");
    write_file(
        root,
        "tests/test_broken.py",
        "import no_such_module_anywhere\n\ndef test_never():\n    pass\n",
    );
}

fn module<'a>(eval: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    first_project(eval)["modules"].get(name).unwrap_or_else(|| panic!("{name} missing in {eval:#}"))
}

fn verdicts(eval: &serde_json::Value, name: &str) -> Vec<(String, String)> {
    module(eval, name)["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| {
            let id = t["nodeid"].as_str().unwrap_or_default();
            (
                id.rsplit("::").next().unwrap_or(id).to_string(),
                t["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

fn check_hostile(warm: bool) {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("hostile");
    hostile_project(&project);
    let started = Instant::now();
    let out = output(
        cdtester(&work.path().join("data"))
            .env("CDT_RUNNER__LIMITS__TIMEOUT_S", "3")
            .env("CDT_RUNNER__LOCAL__WARM", warm.to_string())
            .args(["run", "--json"])
            .arg(&project),
    );
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    assert!(out.status.success(), "{}", describe(&out));
    assert_no_panic(&out);
    let eval = run_json(&out);
    assert_eq!(verdicts(&eval, "tests/test_ok.py"), pairs(&[("test_one", "passed"), ("test_two", "passed")]));
    assert_eq!(
        verdicts(&eval, "tests/test_hang.py"),
        pairs(&[("test_before", "passed"), ("test_forever", "timeout"), ("test_after", "timeout")])
    );
    assert!(
        module(&eval, "tests/test_hang.py")["note"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out after 3 s")
    );
    assert_eq!(
        verdicts(&eval, "tests/test_kill.py"),
        pairs(&[("test_before", "passed"), ("test_kill", "crashed"), ("test_after", "crashed")])
    );
    assert!(module(&eval, "tests/test_kill.py")["note"].as_str().unwrap_or_default().contains("signal 9"));
    assert_eq!(
        verdicts(&eval, "tests/test_exit.py"),
        pairs(&[("test_before", "passed"), ("test_exit", "crashed")])
    );
    assert_eq!(verdicts(&eval, "tests/test_segv.py"), pairs(&[("test_segv", "crashed")]));
    let broken = verdicts(&eval, "tests/test_broken.py");
    assert_eq!(broken, pairs(&[("tests/test_broken.py", "error")]));
    let msg =
        module(&eval, "tests/test_broken.py")["tests"][0]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("no_such_module_anywhere"), "{msg}");
    // 5 passed; 2 timeouts, 4 crashed and 1 error count as failures: 20 * 5 / 12.
    let grade = first_project(&eval)["grade"].as_f64().expect("grade");
    assert!((grade - 8.33).abs() < 0.01, "{grade}");
}

#[test]
fn hanging_and_dying_modules_get_verdicts_with_the_warm_worker() {
    check_hostile(true);
}

#[test]
fn hanging_and_dying_modules_get_verdicts_in_fresh_interpreters() {
    check_hostile(false);
}
