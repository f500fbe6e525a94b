//! The docker runner (`cargo test -p cdtester-runners`) against the real engine: its sandbox
//! (memory, pids, network, file system, wall clock, crashes, output caps) with bind mounts, and
//! a project run with its files brought in through volumes, as a node running in a container
//! does. The node-level checks (a killed node's containers removed) are in `docker_sandbox.rs`.

mod docker_common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use cdtester_runner_api::{Limits, ModuleReport, Outcome, ProjectSource, Runner, TaskSpec};
use docker_common::{containers_of, engine_available, node_id, runner};

fn limits() -> Limits {
    Limits { timeout_s: 20, memory_mb: 128, cpus: 1.0, pids: 64, output_kib: 4, tmpfs_mb: 16 }
}

/// Outcome of every test of `report`, by test name (the part after `::`).
fn outcomes(report: &ModuleReport) -> BTreeMap<String, Outcome> {
    report
        .tests
        .iter()
        .map(|t| (t.nodeid.rsplit("::").next().unwrap_or(&t.nodeid).to_string(), t.outcome))
        .collect()
}

fn hostile_project(root: &Path, host_port: u16) {
    write_file(
        root,
        "tests/test_memory.py",
        "def test_small():\n    x = b'x' * (8 << 20)\n    assert len(x) == 8 << 20\n\n\
         def test_hog():\n    blocks = []\n    while True:\n        blocks.append(b'x' * (16 << 20))\n",
    );
    write_file(
        root,
        "tests/test_forkbomb.py",
        "import os, time\n\n\
         def test_bomb():\n    forked = 0\n    while True:\n        pid = os.fork()\n        if pid == 0:\n            \
         try:\n                os.fork()\n            except OSError:\n                pass\n            \
         time.sleep(120)\n            os._exit(0)\n        forked += 1\n        assert forked < 100000\n\n\
         def test_after_bomb():\n    assert True\n",
    );
    write_file(
        root,
        "tests/test_network.py",
        &format!(
            "import socket\n\n\
             def test_host_loopback():\n    socket.create_connection(('127.0.0.1', {host_port}), timeout=3).close()\n\n\
             def test_internet():\n    socket.create_connection(('1.1.1.1', 53), timeout=3).close()\n\n\
             def test_dns():\n    socket.getaddrinfo('pypi.org', 443)\n"
        ),
    );
    write_file(
        root,
        "tests/test_files.py",
        "import os\n\n\
         def test_write_root():\n    open('/cdt-escape', 'w').write('x')\n\n\
         def test_write_etc():\n    open('/etc/cdt-escape', 'w').write('x')\n\n\
         def test_write_usr():\n    open('/usr/lib/cdt-escape', 'w').write('x')\n\n\
         def test_write_mounted_source():\n    open('/src/cdt-escape', 'w').write('x')\n\n\
         def test_write_tmp():\n    open('/tmp/ok', 'w').write('x')\n\n\
         def test_write_cwd():\n    open('written-by-test', 'w').write('x')\n\n\
         def test_fill_tmpfs():\n    with open('/tmp/big', 'wb') as f:\n        for _ in range(64):\n            f.write(b'x' * (1 << 20))\n",
    );
    write_file(
        root,
        "tests/test_crash.py",
        "import os\n\ndef test_ok():\n    pass\n\ndef test_abort():\n    os.abort()\n\ndef test_never_reached():\n    pass\n",
    );
    write_file(root, "tests/test_noisy.py", "def test_noisy():\n    print('n' * 100000)\n    assert False\n");
    write_file(
        root,
        "tests/test_loop.py",
        "def test_first():\n    pass\n\ndef test_spin():\n    while True:\n        pass\n\ndef test_after():\n    pass\n",
    );
}

#[test]
fn hostile_tests_are_contained_and_get_sandbox_verdicts() {
    if !engine_available("hostile_tests_are_contained_and_get_sandbox_verdicts") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("a host listener");
    let port = listener.local_addr().expect("its address").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("hostile");
    hostile_project(&root, port);
    let node = node_id("hostile");
    let runner = runner(&node, dir.path(), limits());
    let source = ProjectSource {
        id: "hostile".into(),
        name: "hostile".into(),
        root: root.clone(),
        extra_requirements: vec![],
    };
    let project = runner.prepare(&source).expect("prepare");
    let modules = runner.discover(&project).expect("discover");
    assert_eq!(modules.len(), 7, "{modules:?}");

    let run = |module: &str, limits: &Limits| {
        let report =
            runner.run(&project, &TaskSpec::new(module, vec![module.to_string()]), limits).expect("run");
        assert_eq!(report.modules.len(), 1, "{report:?}");
        report.modules.into_iter().next().expect("one module")
    };

    // Memory: the hog is OOM-killed (memory = memory+swap, so it cannot swap either).
    let mem = run("tests/test_memory.py", &limits());
    let got = outcomes(&mem);
    assert_eq!(got.get("test_small"), Some(&Outcome::Passed), "{mem:?}");
    assert_eq!(got.get("test_hog"), Some(&Outcome::Oom), "{mem:?}");

    // Fork bomb: the pids limit stops it, the test fails, the next test runs, and the container
    // (full of sleeping children) is discarded rather than reused.
    let bomb = run("tests/test_forkbomb.py", &limits());
    let got = outcomes(&bomb);
    assert_eq!(got.get("test_bomb"), Some(&Outcome::Failed), "{bomb:?}");
    assert_eq!(got.get("test_after_bomb"), Some(&Outcome::Passed), "{bomb:?}");
    let why = bomb.tests.iter().find(|t| t.nodeid.ends_with("test_bomb")).and_then(|t| t.message.clone());
    assert!(why.as_deref().unwrap_or("").contains("Resource temporarily unavailable"), "{why:?}");
    assert!(bomb.duration < 15.0, "the bomb's leftovers must not hold the run until the timeout: {bomb:?}");
    assert!(containers_of(&node).is_empty(), "the bombed container must be removed");

    // No network at all: not the host's loopback, not the internet, not DNS.
    listener.set_nonblocking(true).expect("nonblocking");
    let net = run("tests/test_network.py", &limits());
    for (name, outcome) in outcomes(&net) {
        assert_eq!(outcome, Outcome::Failed, "{name} must fail without network: {net:?}");
    }
    assert_eq!(net.tests.len(), 3);
    assert!(listener.accept().is_err(), "nothing may have reached the host's listener");

    // Read-only root and source, writable size-capped tmpfs.
    let files = run("tests/test_files.py", &limits());
    let got = outcomes(&files);
    for name in [
        "test_write_root",
        "test_write_etc",
        "test_write_usr",
        "test_write_mounted_source",
        "test_fill_tmpfs",
    ] {
        assert_eq!(got.get(name), Some(&Outcome::Failed), "{name}: {files:?}");
    }
    for name in ["test_write_tmp", "test_write_cwd"] {
        assert_eq!(got.get(name), Some(&Outcome::Passed), "{name}: {files:?}");
    }
    assert!(!root.join("written-by-test").exists() && !root.join("cdt-escape").exists());

    // A dying interpreter: the finished test keeps its verdict, the rest are `crashed`.
    let crash = run("tests/test_crash.py", &limits());
    let got = outcomes(&crash);
    assert_eq!(got.get("test_ok"), Some(&Outcome::Passed), "{crash:?}");
    assert_eq!(got.get("test_abort"), Some(&Outcome::Crashed), "{crash:?}");
    assert_eq!(got.get("test_never_reached"), Some(&Outcome::Crashed), "{crash:?}");

    // Output beyond output_kib is cut and marked.
    let noisy = run("tests/test_noisy.py", &limits());
    assert_eq!(outcomes(&noisy).get("test_noisy"), Some(&Outcome::Failed));
    assert!(noisy.output_truncated, "{:?}", noisy.output.as_deref().map(str::len));
    assert!(noisy.output.as_deref().unwrap_or("").contains("output truncated"));
    assert!(noisy.output.as_deref().unwrap_or("").len() < 6 * 1024);

    // Wall clock: the spinning test times out, its container is killed and gone. (Containers are
    // pooled per limits: the idle one from the modules above stays.)
    let before = containers_of(&node);
    assert_eq!(before.len(), 1, "one idle container: {before:?}");
    let short = Limits { timeout_s: 4, ..limits() };
    let started = Instant::now();
    let spin = run("tests/test_loop.py", &short);
    let got = outcomes(&spin);
    assert_eq!(got.get("test_first"), Some(&Outcome::Passed), "{spin:?}");
    assert_eq!(got.get("test_spin"), Some(&Outcome::Timeout), "{spin:?}");
    assert_eq!(got.get("test_after"), Some(&Outcome::Timeout), "{spin:?}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    assert_eq!(containers_of(&node), before, "the timed-out container must be gone");

    // A well-behaved module afterwards still runs (in a new container), and release removes it.
    let again = run("tests/test_crash.py", &limits());
    assert_eq!(outcomes(&again).get("test_ok"), Some(&Outcome::Passed));
    assert_eq!(containers_of(&node).len(), 1, "one idle container kept for the project");
    runner.release(&project);
    assert!(containers_of(&node).is_empty(), "release removes the project's containers");
    drop(runner);
    assert!(containers_of(&node).is_empty());
}

#[test]
fn a_project_runs_with_its_files_in_volumes() {
    if !engine_available("a_project_runs_with_its_files_in_volumes") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("vol");
    write_file(
        &root,
        "tests/test_a.py",
        "def test_ok():\n    assert True\n\ndef test_bad():\n    assert 1 == 2\n",
    );
    write_file(&root, "tests/data.txt", "payload\n");
    write_file(
        &root,
        "tests/test_b.py",
        "import pathlib\n\ndef test_reads_its_file():\n    assert (pathlib.Path(__file__).parent / 'data.txt').read_text() == 'payload\\n'\n",
    );
    let node = node_id("volumes");
    let mut settings = docker_common::settings(&node, dir.path(), limits());
    settings.mounts = cdtester_runners::docker::volumes::MountMode::Volume;
    let runner = cdtester_runners::docker::DockerRunner::new(settings).expect("runner");
    let source = ProjectSource {
        id: "vol".into(),
        name: "vol".into(),
        root: root.clone(),
        extra_requirements: vec![],
    };
    let project = runner.prepare(&source).expect("prepare");
    let modules = runner.discover(&project).expect("discover");
    assert_eq!(modules, ["tests/test_a.py", "tests/test_b.py"]);
    let report = runner.run(&project, &TaskSpec::new("all", modules.clone()), &limits()).expect("run");
    let got: Vec<BTreeMap<String, Outcome>> = report.modules.iter().map(outcomes).collect();
    assert_eq!(got[0]["test_ok"], Outcome::Passed, "{report:?}");
    assert_eq!(got[0]["test_bad"], Outcome::Failed, "{report:?}");
    assert_eq!(got[1]["test_reads_its_file"], Outcome::Passed, "{report:?}");
    let volumes = |node: &str| {
        let out = std::process::Command::new("docker")
            .args(["volume", "ls", "-q", "--filter", &format!("label=cdtester.node={node}")])
            .output()
            .expect("docker volume ls");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(!volumes(&node).is_empty(), "the project's files went through volumes");
    runner.release(&project);
    drop(runner);
    assert_eq!(volumes(&node), "", "volumes are removed with the runner");
}

fn write_file(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("create folder");
    std::fs::write(path, text).expect("write file");
}
