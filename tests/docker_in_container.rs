//! The docker runner from a node that itself runs in a container (issue: deploying across
//! machines, item 4): a container of the node image with the engine's socket mounted runs its
//! projects' tests in sandbox containers. Its paths mean nothing to the engine, so project
//! copies, environments and the plugin reach the sandboxes through volumes filled over the
//! engine's API (`runner.docker.mounts = "auto"` finds it is in a container). A src-layout
//! project's environment is built in a sandbox from wheels of a wheelhouse mounted into the node
//! (`runner.wheelhouse`), so nothing needs the package index from inside the node. Counts are
//! pytest's; stopping the node leaves none of its containers or volumes behind. Skips, saying
//! why, without an engine.

mod common;
mod docker_common;
mod node_common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn docker(args: &[&str]) -> std::process::Output {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(out.status.success(), "docker {args:?}: {}", common::describe(&out));
    out
}

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The node's container, removed (with its anonymous volumes) on drop.
struct NodeContainer(String);

impl Drop for NodeContainer {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", "-v", &self.0]).output();
    }
}

/// Names of the containers and volumes labelled as the runner's for node `node_id`.
fn leftovers(node_id: &str) -> String {
    let filter = format!("label=cdtester.node={node_id}");
    let containers = text(&docker(&["ps", "-a", "-q", "--filter", &filter]));
    let volumes = text(&docker(&["volume", "ls", "-q", "--filter", &filter]));
    format!("{containers}{volumes}")
}

fn write_projects(root: &Path) {
    common::write_file(
        root,
        "alice/tests/test_calc.py",
        "def test_a():\n    assert 1 + 1 == 2\n\ndef test_b():\n    assert 2 * 2 == 4\n\ndef test_c():\n    assert 1 == 2\n",
    );
    common::write_file(
        root,
        "bob/pyproject.toml",
        "[build-system]\nrequires = [\"setuptools>=61\"]\nbuild-backend = \"setuptools.build_meta\"\n\n\
         [project]\nname = \"bobcalc\"\nversion = \"0.1\"\n",
    );
    common::write_file(root, "bob/src/bobcalc/__init__.py", "def add(a, b):\n    return a + b\n");
    common::write_file(
        root,
        "bob/tests/test_add.py",
        "from bobcalc import add\n\ndef test_add():\n    assert add(2, 2) == 4\n",
    );
}

#[test]
fn a_node_in_a_container_runs_tests_in_sandboxes_through_volumes() {
    if !docker_common::engine_available("a_node_in_a_container_runs_tests_in_sandboxes_through_volumes") {
        return;
    }
    let out = common::output(common::cdtester(Path::new("unused")).args(["image", "build", "--node"]));
    assert!(out.status.success(), "image build --node: {}", common::describe(&out));

    let work = tempfile::tempdir().expect("tempdir");
    let (projects, house) = (work.path().join("class"), work.path().join("wheels"));
    write_projects(&projects);
    let out = common::output(
        common::cdtester(&work.path().join("prep"))
            .args(["env", "prepare", "--python-version", "3.11", "--wheelhouse"])
            .arg(&house)
            .arg(&projects),
    );
    assert!(out.status.success(), "env prepare: {}", common::describe(&out));
    for entry in std::fs::read_dir(&house).expect("wheelhouse") {
        let path = entry.expect("entry").path();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    }
    std::fs::set_permissions(&house, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");

    let socket = "/var/run/docker.sock";
    let gid = std::fs::metadata(socket).map(|m| std::os::unix::fs::MetadataExt::gid(&m)).unwrap_or(0);
    let name = format!("cdtdind{}", std::process::id());
    let node_id = "127.0.0.1:7000";
    let mount = format!("{}:/wheels:ro", house.display());
    let run = docker(&[
        "run",
        "-d",
        "--init",
        "--name",
        &name,
        "-v",
        &format!("{socket}:{socket}"),
        "--group-add",
        &gid.to_string(),
        "-v",
        &mount,
        "-e",
        &format!("CDT_NODE__SECRET={}", hex::encode(rand::random::<[u8; 32]>())),
        "-e",
        &format!("CDT_NODE__ADVERTISE={node_id}"),
        "-e",
        "CDT_RUNNER__DEFAULT=docker",
        "-e",
        "CDT_RUNNER__WHEELHOUSE=/wheels",
        "-p",
        "127.0.0.1::8000",
        "cdtester-node:latest",
    ]);
    let container = NodeContainer(text(&run));
    let port = text(&docker(&["port", &container.0, "8000/tcp"]));
    let http: SocketAddr = port.lines().next().expect("published port").parse().expect("address");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let report = rt.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while node_common::client()
            .get_json::<serde_json::Value>(http, "/network", Duration::from_secs(2))
            .await
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "the node never answered: {}", logs(&container.0));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let zip =
            node_common::zip_projects(&[("alice", projects.join("alice")), ("bob", projects.join("bob"))]);
        let id = node_common::submit_zip(http, &zip).await;
        node_common::wait_finished(http, id, Duration::from_secs(300)).await
    });
    let got = node_common::module_counts(&report);
    assert_eq!(got["alice"]["tests/test_calc.py"], [2, 1, 0, 0, 0, 0], "{report}\n{}", logs(&container.0));
    assert_eq!(got["bob"]["tests/test_add.py"], [1, 0, 0, 0, 0, 0], "{report}\n{}", logs(&container.0));
    assert_eq!(report["projects"]["alice"]["runner"], "docker", "{report}");
    assert!(logs(&container.0).contains("through volumes"), "{}", logs(&container.0));

    // A graceful stop removes the node's sandboxes and volumes.
    docker(&["stop", "-t", "20", &container.0]);
    assert_eq!(leftovers(node_id), "", "containers or volumes left behind");
}

fn logs(container: &str) -> String {
    let out = Command::new("docker").args(["logs", "--tail", "60", container]).output().expect("docker logs");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
