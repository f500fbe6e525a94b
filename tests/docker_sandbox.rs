//! Container cleanup after a crashed node, against the real engine: a `cdtester run` killed with
//! `kill -9` mid-run leaves its container, which the next runner start with the same node id
//! removes. (The runner's sandbox itself is tested in `docker_runner.rs`, in the runners crate.)

mod common;
mod docker_common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use cdtester_runner_api::Limits;
use common::write_file;
use docker_common::{containers_of, engine_available, runner};

fn limits() -> Limits {
    Limits { timeout_s: 20, memory_mb: 128, cpus: 1.0, pids: 64, output_kib: 4, tmpfs_mb: 16 }
}

#[test]
fn containers_of_a_killed_node_are_removed_at_the_next_start() {
    if !engine_available("containers_of_a_killed_node_are_removed_at_the_next_start") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("sleepy");
    write_file(&root, "tests/test_sleep.py", "import time\n\ndef test_sleep():\n    time.sleep(600)\n");
    let bind = format!("127.0.0.1:{}", 20000 + std::process::id() % 20000);
    // A node (here `cdtester run`) evaluating with the docker runner, killed mid-run.
    let mut child = common::cdtester(&dir.path().join("data"))
        .args(["run", root.to_str().expect("utf-8 path"), "--json"])
        .env("CDT_RUNNER__DEFAULT", "docker")
        .env("CDT_NODE__BIND", &bind)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cdtester run starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while containers_of(&bind).is_empty() {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            panic!("cdtester run never started a container (exit: {:?})", child.try_wait());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().expect("kill -9 the node");
    child.wait().expect("reap it");
    let orphans = containers_of(&bind);
    assert!(!orphans.is_empty(), "a killed node leaves its container behind");

    // The next start with the same node id removes them.
    let runner = runner(&bind, dir.path(), limits());
    assert!(containers_of(&bind).is_empty(), "orphans {orphans:?} must be removed at start");
    drop(runner);
}
