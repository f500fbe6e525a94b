//! How the directories a container sees (the project copy, its environment, the reporting plugin,
//! the wheels of an environment build) reach it.
//!
//! A bind mount names a path on the Docker engine's host. When this node runs on that host, its
//! cache directory is such a path and bind mounts are used. When the node itself runs in a
//! container (with the engine's socket mounted), its paths mean nothing to the engine: each
//! directory is then copied once into a named volume (a stopped carrier container with the
//! volume mounted receives a tar of it through the engine's API, symlinks kept as links, never
//! followed) and sandboxes mount the volume read-only. The directories are immutable once made,
//! so a volume is filled once and reused for as long as its directory is in use.
//!
//! Volumes carry the node and owner labels of the runner's containers: they are removed when
//! their project is released, with every container at shutdown, and those of a dead process of
//! the same node at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListVolumesOptionsBuilder, RemoveVolumeOptionsBuilder,
    UploadToContainerOptionsBuilder,
};
use sha2::{Digest, Sha256};

use super::DockerError;
use super::sandbox::{self, LABEL_NODE, LABEL_OWNER};

/// Where the carrier container mounts the volume it fills.
const FILL_AT: &str = "/fill";

/// `runner.docker.mounts`: how directories reach containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMode {
    /// Bind mounts when this process runs on the engine's host, volumes when it runs in a
    /// container (it has `/.dockerenv` or `/run/.containerenv`).
    Auto,
    Bind,
    Volume,
}

impl MountMode {
    /// Whether directories go through volumes.
    pub fn uses_volumes(self) -> bool {
        match self {
            MountMode::Bind => false,
            MountMode::Volume => true,
            MountMode::Auto => in_container(),
        }
    }
}

/// Whether this process runs inside a container.
pub fn in_container() -> bool {
    Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists()
}

/// What a container mounts: a host directory, or a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Host(PathBuf),
    Volume(String),
}

/// The volumes this runner made, by the directory each holds.
#[derive(Debug, Default)]
pub struct Volumes {
    filled: Mutex<HashMap<PathBuf, String>>,
}

impl Volumes {
    fn filled(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, String>> {
        self.filled.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A volume holding `dir` (filled now unless done already), for `node_id`'s containers.
    pub async fn volume_of(
        &self,
        docker: &Docker,
        image: &str,
        node_id: &str,
        dir: &Path,
    ) -> Result<String, DockerError> {
        if let Some(name) = self.filled().get(dir) {
            return Ok(name.clone());
        }
        let name = volume_name(node_id, dir);
        let labels = HashMap::from([
            (LABEL_NODE.to_string(), node_id.to_string()),
            (LABEL_OWNER.to_string(), sandbox::owner_id().to_string()),
        ]);
        let request =
            VolumeCreateRequest { name: Some(name.clone()), labels: Some(labels), ..Default::default() };
        docker.create_volume(request).await.map_err(|e| DockerError::engine("creating a volume", e))?;
        if let Err(e) = fill(docker, image, node_id, &name, dir).await {
            remove_volume(docker, &name).await;
            return Err(e);
        }
        self.filled().insert(dir.to_path_buf(), name.clone());
        Ok(name)
    }

    /// Removes the volume holding `dir`, if there is one (its containers must be gone).
    pub async fn forget(&self, docker: &Docker, dir: &Path) {
        let name = self.filled().remove(dir);
        if let Some(name) = name {
            remove_volume(docker, &name).await;
        }
    }

    /// Forgets every volume (the caller removes them by label).
    pub fn clear(&self) {
        self.filled().clear();
    }
}

/// `cdtester-<node>-<hash of the directory>`: stable for a directory, distinct per node.
fn volume_name(node_id: &str, dir: &Path) -> String {
    let mut h = Sha256::new();
    h.update(node_id.as_bytes());
    h.update([0]);
    h.update(dir.as_os_str().as_encoded_bytes());
    let node: String =
        node_id.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(40).collect();
    format!("cdtester-{node}-{}", hex::encode(&h.finalize()[..10]))
}

/// Copies `dir` into volume `name` through a carrier container that never starts.
async fn fill(
    docker: &Docker,
    image: &str,
    node_id: &str,
    name: &str,
    dir: &Path,
) -> Result<(), DockerError> {
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(vec!["/bin/true".into()]),
        network_disabled: Some(true),
        labels: Some(HashMap::from([
            (LABEL_NODE.to_string(), node_id.to_string()),
            (LABEL_OWNER.to_string(), sandbox::owner_id().to_string()),
        ])),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            mounts: Some(vec![Mount {
                target: Some(FILL_AT.into()),
                source: Some(name.to_string()),
                typ: Some(MountType::VOLUME),
                read_only: Some(false),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(&format!("{name}-fill")).build();
    let carrier = docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| DockerError::engine("creating a volume's carrier container", e))?;
    let dir = dir.to_path_buf();
    let tar = tokio::task::spawn_blocking(move || tar_of(&dir))
        .await
        .map_err(|e| DockerError::Command { what: "packing a directory".into(), detail: e.to_string() })??;
    let options = UploadToContainerOptionsBuilder::default().path(FILL_AT).build();
    let uploaded =
        docker.upload_to_container(&carrier.id, Some(options), bollard::body_full(tar.into())).await;
    sandbox::remove(docker, &carrier.id).await;
    uploaded.map_err(|e| DockerError::engine("copying a directory into its volume", e))
}

/// A tar of `dir`'s content (symlinks stored as links).
fn tar_of(dir: &Path) -> Result<Vec<u8>, DockerError> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    Ok(builder.into_inner()?)
}

async fn remove_volume(docker: &Docker, name: &str) {
    let options = RemoveVolumeOptionsBuilder::default().force(true).build();
    match docker.remove_volume(name, Some(options)).await {
        Ok(()) => tracing::debug!(volume = %name, "volume removed"),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(e) => tracing::warn!(volume = %name, error = %e, "could not remove a volume"),
    }
}

/// Removes the volumes of `node_id` whose owner process `keep` does not keep (their containers
/// must be gone); returns how many.
pub async fn remove_labelled(
    docker: &Docker,
    node_id: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<usize, DockerError> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={node_id}")])]);
    let options = ListVolumesOptionsBuilder::default().filters(&filters).build();
    let listed =
        docker.list_volumes(Some(options)).await.map_err(|e| DockerError::engine("listing volumes", e))?;
    let mut removed = 0;
    for v in listed.volumes.unwrap_or_default() {
        let owner = v.labels.get(LABEL_OWNER).map(String::as_str).unwrap_or_default();
        if !keep(owner) {
            remove_volume(docker, &v.name).await;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_stable_per_directory_and_node() {
        let a = volume_name("127.0.0.1:7000", Path::new("/data/docker/projects/p-1/root"));
        assert_eq!(a, volume_name("127.0.0.1:7000", Path::new("/data/docker/projects/p-1/root")));
        assert_ne!(a, volume_name("127.0.0.1:7001", Path::new("/data/docker/projects/p-1/root")));
        assert_ne!(a, volume_name("127.0.0.1:7000", Path::new("/data/docker/projects/p-2/root")));
        assert!(a.starts_with("cdtester-127-0-0-1-7000-"), "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
    }

    #[test]
    fn a_tar_keeps_symlinks_as_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.py"), "x = 1\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        let tar = tar_of(dir.path()).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let kinds: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().to_string_lossy().into_owned(), e.header().entry_type())
            })
            .collect();
        assert!(kinds.contains(&("link".into(), tar::EntryType::Symlink)), "{kinds:?}");
        assert!(kinds.contains(&("a.py".into(), tar::EntryType::Regular)), "{kinds:?}");
    }
}
