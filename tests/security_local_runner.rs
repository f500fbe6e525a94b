//! Issue 9, H6: the `local` runner confines the tests it runs. Attacks made by submitted test
//! modules against the real `cdtester run` binary and a real node on 127.0.0.1:
//! - a test reads the node's environment (`CDT_NODE__SECRET`, another variable) and prints it:
//!   neither value reaches the test, collection, or the report (warm worker and fresh interpreter);
//! - tests run as another uid than a root node, with no groups, in their own session;
//! - a test tries every way to kill its parent and the node (found by walking /proc): EPERM, and
//!   the node still answers;
//! - a fork bomb, a huge file and a CPU burner are stopped by the rlimits, the node keeps working.

mod common;
mod node_common;

use std::path::Path;
use std::time::Duration;

use common::{cdtester, describe, output, run_json, write_file};
use hyper::StatusCode;
use serde_json::Value;

/// The uid/gid tests must have: 65534 (`nobody`) under a root node, else the node's own.
fn expected_test_ids() -> (u32, u32) {
    // SAFETY: plain syscalls without arguments.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 { (65534, 65534) } else { (uid, gid) }
}

fn random_value(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
    format!("{tag}-{}-{nanos:x}", std::process::id())
}

/// Per module of the only project of a `cdtester run --json` output: (passed, failed, crashed).
fn module_verdicts(eval: &Value) -> Vec<(String, u64, u64, u64)> {
    let project = common::first_project(eval);
    assert!(project.get("error").is_none(), "{eval:#}");
    project["modules"]
        .as_object()
        .expect("modules")
        .iter()
        .map(|(name, m)| {
            let c = &m["counts"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            (name.clone(), n("passed"), n("failed"), n("crashed"))
        })
        .collect()
}

/// A project whose collection (conftest) and tests check the environment by *name* only (the
/// values never appear in its source), and which prints its whole environment in a failing test
/// so that the output is kept in the report.
fn env_reader_project(root: &Path) {
    let allowed = "{'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', 'PYTHONDONTWRITEBYTECODE', \
                   'PYTHONPATH', 'CDTESTER_REPORT_FILE', 'CDTESTER_CHUNK'}";
    write_file(
        root,
        "tests/conftest.py",
        "import os\n\n\
         # Runs during collection (discovery) as well as in every module run.\n\
         if [n for n in os.environ if n.startswith('CDT_')] or 'SEC_LOCAL_MARKER' in os.environ:\n    \
             raise SystemExit('the node environment reached collection')\n",
    );
    write_file(
        root,
        "tests/test_env.py",
        &format!(
            "import os\n\n\
             def test_the_environment_is_the_allow_list():\n    \
                 names = set(os.environ) - {{n for n in os.environ if n.startswith('PYTEST_')}}\n    \
                 assert not [n for n in names if n.startswith('CDT_')] and 'SEC_LOCAL_MARKER' not in names\n    \
                 assert names <= {allowed}, sorted(names - {allowed})\n    \
                 assert os.environ['PATH'].endswith(':/usr/bin:/bin')\n    \
                 assert os.environ['HOME'] != os.environ['TMPDIR']\n    \
                 for var in ('HOME', 'TMPDIR'):\n        \
                     probe = os.path.join(os.environ[var], 'probe')\n        \
                     open(probe, 'w').close()\n        \
                     os.remove(probe)\n\n\
             def test_prints_everything_it_can_see():\n    \
                 print('ENVIRONMENT-DUMP', dict(os.environ))\n    \
                 for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n        \
                     try:\n            \
                         print(open(f'/proc/{{pid}}/environ', 'rb').read())\n        \
                     except OSError:\n            \
                         pass\n    \
                 assert False, 'fails so that its output is kept in the report'\n"
        ),
    );
}

#[test]
fn the_node_environment_never_reaches_tests_nor_the_report() {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("envreader");
    env_reader_project(&project);
    let secret = random_value("node-secret");
    let marker = random_value("marker");
    for warm in ["true", "false"] {
        let out = output(
            cdtester(&work.path().join(format!("data-{warm}")))
                .args(["run", "--json"])
                .arg(&project)
                .env("CDT_NODE__SECRET", &secret)
                .env("SEC_LOCAL_MARKER", &marker)
                .env("CDT_RUNNER__LOCAL__WARM", warm),
        );
        assert!(out.status.success(), "warm={warm}: {}", describe(&out));
        let eval = run_json(&out);
        assert_eq!(
            module_verdicts(&eval),
            [("tests/test_env.py".to_string(), 1, 1, 0)],
            "warm={warm}: the allow-list check passes, the dump fails on purpose:\n{eval:#}"
        );
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains("ENVIRONMENT-DUMP"), "warm={warm}: the dump is in the report:\n{report}");
        assert!(!report.contains(&secret), "warm={warm}: the secret leaked into the report:\n{report}");
        assert!(!report.contains(&marker), "warm={warm}: the node's variable leaked:\n{report}");
    }
}

#[test]
fn tests_run_as_an_unprivileged_uid_without_groups_in_their_own_session() {
    let work = tempfile::tempdir().expect("tempdir");
    let project = work.path().join("whoami");
    let (uid, gid) = expected_test_ids();
    // SAFETY: plain syscalls without arguments.
    let (node_uid, node_sid) = unsafe { (libc::geteuid(), libc::getsid(0)) };
    write_file(
        &project,
        "tests/test_whoami.py",
        &format!(
            "import os\n\n\
             def test_credentials():\n    \
                 assert (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == ({uid}, {uid}, {gid}, {gid})\n    \
                 assert os.getgroups() in ([], [{gid}])\n\n\
             def test_uid_differs_from_a_root_node():\n    \
                 if {node_uid} == 0:\n        \
                     assert os.getuid() != 0\n\n\
             def test_own_session_and_group():\n    \
                 assert os.getsid(0) == os.getpid() == os.getpgid(0)\n    \
                 assert os.getsid(0) != {node_sid}\n"
        ),
    );
    for warm in ["true", "false"] {
        let out = output(
            cdtester(&work.path().join(format!("data-{warm}")))
                .args(["run", "--json"])
                .arg(&project)
                .env("CDT_RUNNER__LOCAL__WARM", warm),
        );
        assert!(out.status.success(), "warm={warm}: {}", describe(&out));
        let eval = run_json(&out);
        assert_eq!(
            module_verdicts(&eval),
            [("tests/test_whoami.py".to_string(), 3, 0, 0)],
            "warm={warm}:\n{eval:#}"
        );
    }
}

/// Tries to kill its parent (the warm worker or the node) and the node, which it finds by
/// walking /proc. It only sends signals once it knows it is not root, so a broken privilege drop
/// fails the test instead of killing processes of the machine.
fn killer_project(root: &Path, node_pid: u32) {
    write_file(
        root,
        "tests/test_killer.py",
        &format!(
            "import os\nimport signal\nimport pytest\n\n\
             NODE = {node_pid}\n\n\
             def node_pids_from_proc():\n    \
                 found = []\n    \
                 for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n        \
                     try:\n            \
                         cmd = open(f'/proc/{{pid}}/cmdline', 'rb').read().split(b'\\0')\n        \
                     except OSError:\n            \
                         continue\n        \
                     if cmd and cmd[0].endswith(b'cdtester') and b'node' in cmd:\n            \
                         found.append(int(pid))\n    \
                 return found\n\n\
             @pytest.fixture(autouse=True)\n\
             def never_as_root():\n    \
                 assert os.getuid() != 0 and os.geteuid() != 0\n\n\
             def test_the_node_is_found_in_proc():\n    \
                 assert NODE in node_pids_from_proc()\n\n\
             @pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP, signal.SIGINT])\n\
             def test_kill_parent(sig):\n    \
                 with pytest.raises(PermissionError):\n        \
                     os.kill(os.getppid(), sig)\n\n\
             @pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP])\n\
             def test_kill_node(sig):\n    \
                 with pytest.raises(PermissionError):\n        \
                     os.kill(NODE, sig)\n\n\
             def test_killpg_node_and_parent_groups():\n    \
                 for pgid in {{os.getpgid(NODE), os.getpgid(os.getppid())}}:\n        \
                     with pytest.raises(PermissionError):\n            \
                         os.killpg(pgid, signal.SIGKILL)\n"
        ),
    );
}

/// Hits each rlimit set for the node below: processes (8 MiB files, 24 processes, 2 CPU s).
fn hog_project(root: &Path) {
    write_file(
        root,
        "tests/test_hog.py",
        "import errno\nimport os\nimport pytest\n\n\
         def test_fork_bomb_is_stopped():\n    \
             r, w = os.pipe()\n    \
             kids, stopped = [], None\n    \
             try:\n        \
                 for _ in range(200):\n            \
                     pid = os.fork()\n            \
                     if pid == 0:\n                \
                         os.close(w)\n                \
                         os.read(r, 1)\n                \
                         os._exit(0)\n            \
                     kids.append(pid)\n    \
             except OSError as e:\n        \
                 stopped = e\n    \
             os.close(w)\n    \
             for pid in kids:\n        \
                 os.waitpid(pid, 0)\n    \
             assert stopped is not None and stopped.errno == errno.EAGAIN, len(kids)\n    \
             assert len(kids) < 24\n\n\
         def test_huge_file_is_stopped():\n    \
             path = os.path.join(os.environ['TMPDIR'], 'huge')\n    \
             with pytest.raises(OSError) as e:\n        \
                 with open(path, 'wb') as f:\n            \
                     for _ in range(64):\n                \
                         f.write(b'x' * (1 << 20))\n                \
                         f.flush()\n    \
             assert e.value.errno == errno.EFBIG\n    \
             assert os.path.getsize(path) <= 8 << 20\n",
    );
    write_file(
        root,
        "tests/test_cpu.py",
        "import time\n\n\
         def test_cpu_burner_is_stopped():\n    \
             end = time.time() + 25\n    \
             while time.time() < end:\n        \
                 pass\n",
    );
    write_file(root, "tests/test_after.py", "def test_still_works():\n    assert 1 + 1 == 2\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_can_neither_kill_the_node_nor_exhaust_the_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = node_common::cluster(
        1,
        &dir.path().join("nodes"),
        &[
            ("CDT_RUNNER__LOCAL__RLIMITS__FSIZE_MIB", "8"),
            ("CDT_RUNNER__LOCAL__RLIMITS__NPROC", "24"),
            ("CDT_RUNNER__LOCAL__RLIMITS__CPU_S", "2"),
            ("CDT_RUNNER__LIMITS__TIMEOUT_S", "60"),
        ],
    )
    .await;
    let node = c.nodes[0].pid().expect("node pid");
    let http = c.nodes[0].http;
    let killer = dir.path().join("killer");
    killer_project(&killer, node);
    let hog = dir.path().join("hog");
    hog_project(&hog);
    let zip = node_common::zip_projects(&[("killer", killer), ("hog", hog)]);
    let id = node_common::submit_zip(http, &zip).await;
    let report = node_common::wait_finished(http, id, Duration::from_secs(300)).await;

    assert!(c.nodes[0].is_running(), "the node survived: {report}");
    let (status, stats) = node_common::get(http, "/stats").await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    let counts = node_common::module_counts(&report);
    // passed, failed, skipped, error, xfailed, xpassed
    assert_eq!(counts["killer"]["tests/test_killer.py"], [9, 0, 0, 0, 0, 0], "{report}");
    assert_eq!(counts["hog"]["tests/test_hog.py"], [2, 0, 0, 0, 0, 0], "{report}");
    assert_eq!(counts["hog"]["tests/test_after.py"], [1, 0, 0, 0, 0, 0], "{report}");
    let cpu = &report["projects"]["hog"]["modules"]["tests/test_cpu.py"];
    assert_eq!(cpu["counts"]["crashed"].as_u64(), Some(1), "RLIMIT_CPU stops the burner: {cpu}");
    assert!(cpu["note"].as_str().is_some_and(|n| n.contains("signal 24")), "SIGXCPU: {cpu}");
    assert!(cpu["time"].as_f64().is_some_and(|t| t < 20.0), "stopped long before its 25 s: {cpu}");

    // A second evaluation on the same node still runs normally.
    let after = dir.path().join("after");
    write_file(&after, "tests/test_ok.py", "def test_ok():\n    pass\n");
    let id = node_common::submit_zip(http, &node_common::zip_projects(&[("after", after)])).await;
    let report = node_common::wait_finished(http, id, Duration::from_secs(120)).await;
    assert_eq!(
        node_common::module_counts(&report)["after"]["tests/test_ok.py"],
        [1, 0, 0, 0, 0, 0],
        "{report}"
    );
    assert!(c.nodes[0].is_running());
    c.shutdown();
}
