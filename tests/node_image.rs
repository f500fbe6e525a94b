//! The node image and the deployment recipe, against the machine's Docker engine: `cdtester
//! image build --node` builds the image (and is a no-op the second time); the compose recipe
//! (`config/deploy/compose.yaml`) starts 3 node containers on a user-created network; a
//! submission gives the exact counts; `docker stop` of one node is seen by the others at once (a
//! graceful leave, well under the failure timeout); `docker kill` of another mid-run still ends
//! with exact counts. Skips, saying why, without an engine or `docker-compose`.

mod common;
mod docker_common;
mod node_common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `docker-compose` (v1) or `docker compose` (v2), whichever answers.
fn compose_command() -> Option<Vec<String>> {
    let candidates: [&[&str]; 2] = [&["docker-compose"], &["docker", "compose"]];
    candidates.iter().find_map(|argv| {
        let ok =
            Command::new(argv[0]).args(&argv[1..]).arg("version").output().is_ok_and(|o| o.status.success());
        ok.then(|| argv.iter().map(|s| s.to_string()).collect())
    })
}

/// A compose project in `dir`, taken down (containers, network, volumes) on drop.
struct Deployment {
    compose: Vec<String>,
    dir: std::path::PathBuf,
    project: String,
    subnet: String,
}

impl Deployment {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = Command::new(&self.compose[0])
            .args(&self.compose[1..])
            .args(["-p", &self.project])
            .args(args)
            .current_dir(&self.dir)
            .env("CDT_SUBNET", &self.subnet)
            .env("CDT_API_PORT", "0")
            .output()
            .expect("run compose");
        assert!(out.status.success(), "compose {args:?}: {}", common::describe(&out));
        out
    }

    fn http(&self, node: u8) -> SocketAddr {
        format!("{}.{}:8000", self.subnet, 10 + node).parse().expect("addr")
    }

    fn udp(&self, node: u8) -> String {
        format!("{}.{}:7000", self.subnet, 10 + node)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = Command::new(&self.compose[0])
            .args(&self.compose[1..])
            .args(["-p", &self.project, "down", "-v", "-t", "2"])
            .current_dir(&self.dir)
            .env("CDT_SUBNET", &self.subnet)
            .env("CDT_API_PORT", "0")
            .output();
    }
}

fn build_image() -> String {
    let out = common::output(common::cdtester(Path::new("unused")).args(["image", "build", "--node"]));
    assert!(out.status.success(), "image build --node: {}", common::describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn network(http: SocketAddr) -> BTreeSet<String> {
    let got = node_common::client().get_json::<Value>(http, "/network", Duration::from_secs(3)).await;
    got.ok().and_then(|v| v.as_object().map(|m| m.keys().cloned().collect())).unwrap_or_default()
}

async fn wait_network(http: SocketAddr, want: &BTreeSet<String>, timeout: Duration) -> Duration {
    let start = Instant::now();
    while network(http).await != *want {
        assert!(
            start.elapsed() < timeout,
            "/network on {http} never became {want:?}: {:?}",
            network(http).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[test]
fn the_node_image_runs_a_network_from_the_compose_recipe() {
    if !docker_common::engine_available("the_node_image_runs_a_network_from_the_compose_recipe") {
        return;
    }
    let Some(compose) = compose_command() else {
        println!(
            "SKIPPED the_node_image_runs_a_network_from_the_compose_recipe: no docker-compose / docker compose"
        );
        return;
    };
    let first = build_image();
    let again = build_image();
    assert!(again.contains("up to date"), "a second build is a no-op: {again} (first: {first})");

    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/deploy/compose.yaml");
    std::fs::copy(&recipe, dir.path().join("compose.yaml")).expect("copy the recipe");
    let secret = format!("CDT_NODE__SECRET={}\n", hex::encode(rand::random::<[u8; 32]>()));
    std::fs::write(dir.path().join("cluster.env"), secret).expect("cluster.env");
    let pid = std::process::id();
    let d = Deployment {
        compose,
        dir: dir.path().to_path_buf(),
        project: format!("cdtimage{pid}"),
        subnet: format!("172.31.{}", 100 + pid % 150),
    };
    d.run(&["up", "-d"]);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(exercise(&d));
}

async fn exercise(d: &Deployment) {
    let all: BTreeSet<String> = (1..=3).map(|i| d.udp(i)).collect();
    for i in 1..=3 {
        wait_network(d.http(i), &all, Duration::from_secs(60)).await;
    }
    // Exact counts of the example projects.
    let examples = tempfile::tempdir().expect("tempdir");
    cdtester::demo::write_examples(examples.path()).expect("examples");
    let zip = node_common::zip_projects(&[
        ("calc", examples.path().join("calc")),
        ("strs", examples.path().join("strs")),
        ("shapes", examples.path().join("shapes")),
    ]);
    let id = node_common::submit_zip(d.http(1), &zip).await;
    let report = node_common::wait_finished(d.http(2), id, Duration::from_secs(300)).await;
    let got = node_common::module_counts(&report);
    assert_eq!(got["calc"]["tests/test_add.py"], [2, 1, 0, 0, 0, 0], "{report}");
    assert_eq!(got["strs"]["tests/test_fixture_error.py"], [1, 0, 0, 1, 0, 0], "{report}");
    assert_eq!(got["shapes"]["tests/test_area.py"], [3, 0, 0, 0, 1, 0], "{report}");

    // docker stop: a graceful leave, seen by the others well before the 2 s failure timeout.
    let stopping = Instant::now();
    d.run(&["stop", "-t", "10", "node3"]);
    let stop_took = stopping.elapsed();
    let two: BTreeSet<String> = [d.udp(1), d.udp(2)].into();
    let seen = wait_network(d.http(1), &two, Duration::from_secs(10)).await;
    eprintln!(
        "MEASURED docker stop took {} ms; node1 dropped node3 {} ms after it returned",
        stop_took.as_millis(),
        seen.as_millis()
    );
    assert!(seen < Duration::from_millis(1500), "the leave was not seen at once: {seen:?}");

    // docker kill mid-run: exact counts anyway.
    let sleepy = tempfile::tempdir().expect("tempdir");
    node_common::sleepy_project(sleepy.path(), 6, 3, 1.0);
    let zip = node_common::zip_projects(&[("sleepy", sleepy.path().to_path_buf())]);
    let id = node_common::submit_zip(d.http(1), &zip).await;
    node_common::wait_executed(d.http(1), id, 1, Duration::from_secs(120)).await;
    d.run(&["kill", "node2"]);
    let report = node_common::wait_finished(d.http(1), id, Duration::from_secs(300)).await;
    assert_eq!(node_common::module_counts(&report)["sleepy"], node_common::sleepy_expected(6, 3), "{report}");
}
