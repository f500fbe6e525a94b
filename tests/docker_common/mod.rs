//! Helpers for the docker runner's end-to-end tests (`tests/docker_*.rs`), which run against the
//! machine's real Docker engine. They skip, with the reason printed, only when no engine answers;
//! a missing runner image is a failure (CI builds it with `cdtester image build` first).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cdtester_runner_api::Limits;
use cdtester_runners::docker::{self, DockerRunner, DockerSettings, sandbox};

/// The image the runner uses in tests (what `cdtester image build` tags by default).
pub const IMAGE: &str = "cdtester-runner:latest";

fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(fut)
}

/// Whether a Docker engine answers; prints why the calling test is skipped when none does.
pub fn engine_available(test: &str) -> bool {
    let answer = block_on(async {
        let docker = docker::connect(None).await.map_err(|e| e.to_string())?;
        docker.ping().await.map_err(|e| e.to_string())
    });
    match answer {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED {test}: no Docker engine reachable ({e})");
            false
        }
    }
}

/// A node id unique to this test process and `tag`.
pub fn node_id(tag: &str) -> String {
    format!("test-{tag}-{}", std::process::id())
}

/// Settings for a runner with its own cache under `dir`.
pub fn settings(node_id: &str, dir: &Path, limits: Limits) -> DockerSettings {
    DockerSettings {
        image: IMAGE.into(),
        socket: None,
        node_id: node_id.into(),
        cache_dir: dir.join("docker-cache"),
        python: python(),
        limits,
        env_mb: 512,
        warm: true,
        wheelhouse: None,
        mounts: cdtester_runners::docker::volumes::MountMode::Auto,
    }
}

/// A runner for `node_id`; panics with a hint when the image is missing.
pub fn runner(node_id: &str, dir: &Path, limits: Limits) -> DockerRunner {
    DockerRunner::new(settings(node_id, dir, limits))
        .unwrap_or_else(|e| panic!("docker runner: {e} (CI builds the image with `cdtester image build`)"))
}

/// The host interpreter (for pip download of corpus sdists and wheels).
pub fn python() -> PathBuf {
    cdtester_runners::local::resolve_python(None).expect("python3 on PATH")
}

/// Ids of every container (running or not) labelled as `node_id`'s: `docker ps -a --filter
/// label=cdtester.node=<id>`.
pub fn containers_of(node_id: &str) -> Vec<String> {
    block_on(async {
        let docker = docker::connect(None).await.expect("engine");
        sandbox::labelled(&docker, sandbox::LABEL_NODE, node_id).await.expect("listing containers")
    })
    .into_iter()
    .map(|(id, _)| id)
    .collect()
}
