//! End-to-end: `cdtester run` on zips holding one project per top-level folder, or one project at
//! the zip's root.

mod common;

use std::io::Write;
use std::path::Path;

use common::{cdtester, describe, output, run_json};

fn write_zip(path: &Path, entries: &[(&str, &str)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).expect("create zip"));
    let opts = zip::write::SimpleFileOptions::default();
    for (name, data) in entries {
        zip.start_file(*name, opts).expect("zip entry");
        zip.write_all(data.as_bytes()).expect("zip data");
    }
    zip.finish().expect("finish zip");
}

const PASSING: &str = "def test_a():\n    assert True\n\ndef test_b():\n    assert 2 > 1\n";
const MIXED: &str = "import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n\n@pytest.mark.skip(reason='later')\ndef test_later():\n    pass\n";

#[test]
fn zip_with_one_project_per_folder_is_graded_per_project() {
    let work = tempfile::tempdir().expect("tempdir");
    let zip = work.path().join("class.zip");
    write_zip(
        &zip,
        &[
            ("alice/tests/test_calc.py", PASSING),
            ("bob/tests/test_calc.py", MIXED),
            ("bob/calc.py", "x = 1\n"),
        ],
    );
    let junit = work.path().join("out.xml");
    let out = output(
        cdtester(&work.path().join("data")).args(["run", "--json", "--junit-xml"]).arg(&junit).arg(&zip),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let eval = run_json(&out);
    let projects = eval["projects"].as_object().expect("projects");
    let names: Vec<&String> = projects.keys().collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(projects["alice"]["grade"], 20.0);
    assert_eq!(projects["bob"]["grade"], 10.0);
    let bob = &projects["bob"]["modules"]["tests/test_calc.py"];
    assert_eq!(
        (
            bob["counts"]["passed"].as_u64(),
            bob["counts"]["failed"].as_u64(),
            bob["counts"]["skipped"].as_u64()
        ),
        (Some(1), Some(1), Some(1))
    );
    assert_eq!(eval["summary"]["grade"], 15.0);
    let xml = std::fs::read_to_string(&junit).expect("junit");
    assert!(
        xml.contains("<testsuite name=\"bob\" tests=\"3\" failures=\"1\" errors=\"0\" skipped=\"1\""),
        "{xml}"
    );

    // The table names each project and its grade.
    let out = output(cdtester(&work.path().join("data")).args(["run"]).arg(&zip));
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("project bob (finished, runner local): grade 10.00/20"), "{table}");
}

#[test]
fn zip_with_a_project_at_its_root_is_named_after_the_zip() {
    let work = tempfile::tempdir().expect("tempdir");
    let zip = work.path().join("solo.zip");
    write_zip(&zip, &[("test_solo.py", PASSING)]);
    let out = output(cdtester(&work.path().join("data")).args(["run", "--json"]).arg(&zip));
    assert!(out.status.success(), "{}", describe(&out));
    let eval = run_json(&out);
    let solo = &eval["projects"]["solo"];
    assert_eq!(solo["modules"]["test_solo.py"]["counts"]["passed"], 2, "{eval:#}");
    assert_eq!(eval["summary"]["tests"]["passed"], 2);
}

#[test]
fn two_runs_at_once_share_a_data_folder_and_its_duration_memory() {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("bob");
    common::write_file(&project, "tests/test_calc.py", MIXED);
    let data = work.path().join("data");
    let started: Vec<std::process::Child> = (0..2)
        .map(|_| {
            cdtester(&data)
                .args(["run", "--json"])
                .arg(&project)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start cdtester run")
        })
        .collect();
    for child in started {
        let out = child.wait_with_output().expect("cdtester run");
        assert!(out.status.success(), "{}", describe(&out));
        let eval = run_json(&out);
        assert_eq!(eval["projects"]["bob"]["grade"], 10.0, "{eval:#}");
    }
    // The module's duration is remembered in the data folder's store (the node's own table).
    let store = cdtester::store::Store::open(&data).expect("the store is free again");
    let durations = store.all_durations().expect("durations");
    let stat = durations.iter().find(|(k, _)| k == "bob::tests/test_calc.py").map(|(_, s)| s.tests);
    assert_eq!(stat, Some(3), "{durations:?}");
}

/// First run on a fresh data folder that also holds the environments (the default
/// `<data_dir>/venvs`): as root, tests run as another uid that must reach the environments
/// through the data folder, which the node makes private; the runner must already know that
/// when it starts (a fresh folder once failed every project with "No module named
/// pytest.__main__" on its first run only).
#[test]
fn a_fresh_data_folder_holding_the_environments_works_on_the_first_run() {
    let work = tempfile::tempdir().expect("tempdir");
    let zip = work.path().join("fresh.zip");
    write_zip(&zip, &[("test_fresh.py", PASSING)]);
    let data = work.path().join("data");
    let out =
        output(cdtester(&data).env_remove("CDT_RUNNER__LOCAL__VENV_DIR").args(["run", "--json"]).arg(&zip));
    assert!(out.status.success(), "{}", describe(&out));
    let eval = run_json(&out);
    assert_eq!(eval["summary"]["total_passed"], 2, "{}", describe(&out));
    assert!(data.join("venvs").is_dir(), "the environments are in the data folder");
}

/// A warm run: the modules ran alone once, so the slot that takes a small module takes others
/// of its project along and the runner runs them in one session (a slow module keeps the whole
/// project from sharing one session at discovery). Every test's outcome stays what the module
/// counted alone.
#[test]
fn a_warm_run_groups_small_modules_of_a_project_and_counts_the_same() {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("course");
    let nonce = work.path().display().to_string();
    common::write_file(&project, "nonce.py", &format!("# {nonce}\n"));
    common::write_file(&project, "tests/test_0.py", "def test_bad():\n    assert 1 == 2\n");
    for i in 1..6 {
        let text = format!(
            "import pytest\n\n@pytest.mark.parametrize('n', range({i}))\ndef test_n{i}(n):\n    assert n < 4\n\n\
             def test_fails_{i}():\n    assert {i} == 0\n"
        );
        common::write_file(&project, &format!("tests/test_{i}.py"), &text);
    }
    common::write_file(
        &project,
        "tests/test_slow.py",
        "import time\n\ndef test_slow():\n    time.sleep(1.2)\n",
    );
    let data = work.path().join("data");
    let run = || {
        let out = output(cdtester(&data).args(["run", "--json", "--workers", "2"]).arg(&project));
        assert!(out.status.success(), "{}", describe(&out));
        run_json(&out)
    };
    let outcomes = |eval: &serde_json::Value| -> Vec<(String, String)> {
        let modules = eval["projects"]["course"]["modules"].as_object().expect("modules");
        let mut v: Vec<(String, String)> = modules
            .values()
            .flat_map(|m| m["tests"].as_array().cloned().unwrap_or_default())
            .map(|t| {
                (
                    t["nodeid"].as_str().unwrap_or("").to_string(),
                    t["outcome"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let cold = run();
    assert_eq!(outcomes(&cold).len(), 22, "{cold:#}");
    let warm = run();
    assert_eq!(outcomes(&warm), outcomes(&cold));
    assert_eq!(warm["summary"], cold["summary"]);
    // Every small module fails somewhere, so each keeps its session's output: at least one of
    // them ran in a session with another (which modules group depends on their timing).
    let modules = warm["projects"]["course"]["modules"].as_object().expect("modules");
    let grouped = (0..6).any(|i| {
        let printed = modules[&format!("tests/test_{i}.py")]["output"].as_str().unwrap_or("");
        (0..6).any(|j| j != i && printed.contains(&format!("test_{j}.py")))
    });
    assert!(grouped, "no small module ran in one session with another: {warm:#}");
}
