//! `cdtester image build --node`: a container image that runs a cdtester node, built with no
//! image registry.
//!
//! Recipe: start from the runner image (`cdtester image build`: debootstrap, python3, pinned
//! pytest wheels, imported; built first when missing), then in one network-less build container:
//! copy in this `cdtester` binary, the pinned wheels (fetched on the host with `pip download`,
//! kept in the image so environments build offline), and Debian's `python3.11-venv` with the
//! pip/setuptools wheels it needs (fetched on the host with `apt-get download`, unpacked with
//! `dpkg-deb`); create the unprivileged user `cdtester` (uid 10001) and the `/data` volume; build
//! the base Python environment by running a one-test probe project as that user, offline. The
//! container is committed with the node's settings: user `cdtester`, entrypoint `cdtester node`,
//! `CDT_*` defaults (bind 0.0.0.0:7000 / 0.0.0.0:8000, data in `/data`), a health check that
//! GETs `/network`, and SIGTERM as stop signal (a graceful leave on `docker stop`).
//!
//! Tagged `cdtester-node:<version>` (a hash of the runner image version, the binary's sha256 and
//! this recipe) and the configured tag; a build whose version exists only re-points the tag.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::models::{ContainerConfig, ContainerCreateBody, HealthConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, ListImagesOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use cdtester_runners::docker::{ImageBuildOptions, build_image, image};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

/// Repository name of the node image.
pub const NODE_REPO: &str = "cdtester-node";
/// The unprivileged user the node runs as.
const UID: u32 = 10001;
/// Debian packages unpacked into the image so that `python3 -m venv` works (ensurepip).
const VENV_DEBS: &[&str] = &["python3.11-venv", "python3-pip-whl", "python3-setuptools-whl"];
/// The node's configuration defaults in the image (any `CDT_*` given to the container wins).
const ENV: &[&str] = &[
    "CDT_NODE__BIND=0.0.0.0:7000",
    "CDT_NODE__HTTP=0.0.0.0:8000",
    "CDT_NODE__DATA_DIR=/data",
    "CDT_RUNNER__LOCAL__VENV_DIR=/opt/cdtester/venvs",
    "PIP_FIND_LINKS=/opt/cdtester/wheels",
    "LANG=C.UTF-8",
];
/// Health check: `GET /network` on the node's HTTP port answers 200.
const HEALTH: &str = "import os, urllib.request; \
    port = os.environ.get('CDT_NODE__HTTP', '0.0.0.0:8000').rsplit(':', 1)[1]; \
    urllib.request.urlopen('http://127.0.0.1:' + port + '/network', timeout=3)";
/// Run as root in the build container: the user, the folders, then the base environment built
/// by a probe run as that user with no package index.
const SETUP: &str = "set -e
useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin cdtester
mkdir -p /data /opt/cdtester/venvs
chown -R cdtester:cdtester /data /opt/cdtester
setpriv --reuid=10001 --regid=10001 --init-groups env HOME=/tmp PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 \
  PIP_FIND_LINKS=/opt/cdtester/wheels CDT_RUNNER__LOCAL__VENV_DIR=/opt/cdtester/venvs \
  CDT_NODE__DATA_DIR=/tmp/probe-data CDT_LOG=warn /usr/local/bin/cdtester run /opt/cdtester/probe
rm -rf /tmp/probe-data /tmp/cdt-* /opt/cdtester/probe";
/// Bumped whenever the steps change in a way the constants above do not show.
const RECIPE_FORMAT: u32 = 1;

/// What [`build_node_image`] needs.
#[derive(Debug, Clone)]
pub struct NodeImageOptions {
    /// Tag to point at the built image (default `cdtester-node:latest`).
    pub tag: String,
    /// How to build (or find) the runner image it starts from.
    pub runner: ImageBuildOptions,
    /// The node binary copied into the image.
    pub binary: PathBuf,
    /// Rebuild even if the version tag exists.
    pub force: bool,
}

/// What [`build_node_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeImageBuilt {
    pub versioned_tag: String,
    pub tag: String,
    pub id: String,
    /// False when the version already existed and nothing was built.
    pub built: bool,
}

/// The image version: 16 hex digits of a sha256 over the runner image version, the binary's
/// hash and this recipe.
pub fn node_version(binary_sha256: &str) -> String {
    let mut h = Sha256::new();
    let parts =
        [RECIPE_FORMAT.to_string(), image::recipe_version(), binary_sha256.to_string(), UID.to_string()];
    let consts = VENV_DEBS.iter().chain(ENV).chain([&HEALTH, &SETUP]);
    for part in parts.iter().map(String::as_str).chain(consts.copied()) {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

fn file_sha256(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Builds (or finds) the node image and points `opts.tag` at it.
pub async fn build_node_image(docker: &Docker, opts: &NodeImageOptions) -> anyhow::Result<NodeImageBuilt> {
    let base = build_image(docker, &opts.runner).await.context("building the runner image it starts from")?;
    let versioned = format!("{NODE_REPO}:{}", node_version(&file_sha256(&opts.binary)?));
    if !opts.force
        && let Ok(found) = docker.inspect_image(&versioned).await
    {
        image::tag_as(docker, &versioned, &opts.tag).await?;
        tracing::info!(image = %versioned, "node image already built; nothing to do");
        let id = found.id.unwrap_or_default();
        return Ok(NodeImageBuilt { versioned_tag: versioned, tag: opts.tag.clone(), id, built: false });
    }
    std::fs::create_dir_all(&opts.runner.work_dir)?;
    let scratch =
        tempfile::Builder::new().prefix("cdtester-node-image-").tempdir_in(&opts.runner.work_dir)?;
    let root = scratch.path().join("root");
    stage(&root, &opts.binary, &opts.runner.python).await?;
    let tar = tar_of(&root)?;
    let container = docker
        .create_container(
            Some(CreateContainerOptionsBuilder::default().build()),
            ContainerCreateBody {
                image: Some(base.versioned_tag.clone()),
                cmd: Some(vec!["/bin/sh".into(), "-c".into(), SETUP.into()]),
                user: Some("0".into()),
                network_disabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .context("creating the build container")?
        .id;
    let built = finish(docker, &container, tar, &versioned).await;
    let remove = RemoveContainerOptionsBuilder::default().force(true).build();
    if let Err(e) = docker.remove_container(&container, Some(remove)).await {
        tracing::warn!(%container, "cannot remove the build container: {e}");
    }
    let id = built?;
    image::tag_as(docker, &versioned, &opts.tag).await?;
    remove_older(docker, &versioned).await;
    Ok(NodeImageBuilt { versioned_tag: versioned, tag: opts.tag.clone(), id, built: true })
}

/// Removes the tags of earlier node image versions (each binary makes a new one), so that
/// rebuilding does not fill the disk; an image still used by a container stays.
async fn remove_older(docker: &Docker, current: &str) {
    let filters = std::collections::HashMap::from([("reference", vec![NODE_REPO])]);
    let options = ListImagesOptionsBuilder::default().filters(&filters).build();
    let Ok(images) = docker.list_images(Some(options)).await else { return };
    let older = images.iter().flat_map(|i| i.repo_tags.iter()).filter(|t| {
        t.strip_prefix(NODE_REPO).and_then(|v| v.strip_prefix(':')).is_some_and(|v| {
            v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit()) && t.as_str() != current
        })
    });
    for tag in older {
        match docker.remove_image(tag, None::<bollard::query_parameters::RemoveImageOptions>, None).await {
            Ok(_) => tracing::info!(image = %tag, "removed an earlier node image version"),
            Err(e) => tracing::debug!(image = %tag, "keeping an earlier node image version: {e}"),
        }
    }
}

/// Uploads the staged files, runs the setup and commits the container as `versioned`.
async fn finish(docker: &Docker, container: &str, tar: Vec<u8>, versioned: &str) -> anyhow::Result<String> {
    let upload = UploadToContainerOptionsBuilder::default().path("/").build();
    docker
        .upload_to_container(container, Some(upload), bollard::body_full(tar.into()))
        .await
        .context("copying the node's files into the build container")?;
    docker.start_container(container, None).await.context("starting the build container")?;
    let mut wait = docker.wait_container(container, None);
    let status = match wait.next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return Err(e).context("waiting for the build container"),
        None => bail!("the build container ended without a status"),
    };
    if status != 0 {
        bail!("the image setup failed (exit {status}):\n{}", logs(docker, container).await);
    }
    let (repo, tag) = versioned.split_once(':').unwrap_or((versioned, "latest"));
    let options = CommitContainerOptionsBuilder::default().container(container).repo(repo).tag(tag).build();
    let committed =
        docker.commit_container(options, node_config()).await.context("committing the node image")?;
    Ok(committed.id)
}

/// The committed image's settings.
fn node_config() -> ContainerConfig {
    let secs = |s: i64| s * 1_000_000_000;
    ContainerConfig {
        user: Some("cdtester".into()),
        env: Some(ENV.iter().map(|e| e.to_string()).collect()),
        entrypoint: Some(vec!["/usr/local/bin/cdtester".into(), "node".into()]),
        cmd: Some(Vec::new()),
        working_dir: Some("/data".into()),
        volumes: Some(vec!["/data".into()]),
        exposed_ports: Some(vec!["7000/udp".into(), "8000/tcp".into()]),
        healthcheck: Some(HealthConfig {
            test: Some(vec!["CMD".into(), "python3".into(), "-c".into(), HEALTH.into()]),
            interval: Some(secs(5)),
            timeout: Some(secs(4)),
            retries: Some(3),
            start_period: Some(secs(10)),
            start_interval: None,
        }),
        stop_signal: Some("SIGTERM".into()),
        stop_timeout: Some(10),
        labels: Some([(image::VERSION_LABEL.to_string(), image::recipe_version())].into()),
        ..Default::default()
    }
}

/// The last lines of a container's output.
async fn logs(docker: &Docker, container: &str) -> String {
    let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail("30").build();
    let mut out = String::new();
    let mut stream = docker.logs(container, Some(options));
    while let Some(Ok(chunk)) = stream.next().await {
        out.push_str(&chunk.to_string());
    }
    out
}

/// Lays out under `root` what goes into the image: the binary, the wheels, the venv support
/// from Debian and the probe project.
async fn stage(root: &Path, binary: &Path, python: &Path) -> anyhow::Result<()> {
    let bin = root.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(binary, bin.join("cdtester")).with_context(|| format!("copying {}", binary.display()))?;
    let wheels = root.join("opt/cdtester/wheels");
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps"]);
    cmd.args(["--only-binary=:all:", "--python-version", image::PYTHON_VERSION, "--implementation", "cp"]);
    cmd.arg("--dest").arg(&wheels).args(image::WHEELS);
    image::run(cmd, "pip download").await?;
    let debs = root.parent().unwrap_or(root).join("debs");
    std::fs::create_dir_all(&debs)?;
    let mut cmd = tokio::process::Command::new("apt-get");
    cmd.current_dir(&debs).arg("download").args(VENV_DEBS);
    image::run(cmd, "apt-get download (Debian's python3.11-venv)").await?;
    for entry in std::fs::read_dir(&debs)? {
        let mut cmd = tokio::process::Command::new("dpkg-deb");
        cmd.arg("-x").arg(entry?.path()).arg(root);
        image::run(cmd, "dpkg-deb -x").await?;
    }
    let probe = root.join("opt/cdtester/probe/tests");
    std::fs::create_dir_all(&probe)?;
    std::fs::write(probe.join("test_probe.py"), "def test_probe():\n    assert True\n")?;
    Ok(())
}

/// A tar of the tree under `root` (owners root; the setup chowns what the user owns).
fn tar_of(root: &Path) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    builder.append_dir_all(".", root).context("packing the node's files")?;
    builder.into_inner().context("packing the node's files")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_follows_the_binary_and_is_stable() {
        let a = node_version("aa");
        assert_eq!(a, node_version("aa"));
        assert_ne!(a, node_version("ab"));
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
