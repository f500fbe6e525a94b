//! The runners this process can use, by the name configuration selects them with.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use cdtester_config::{Config, DockerMounts};
use cdtester_runner_api::Runner;
use cdtester_runners::docker::volumes::MountMode;
use cdtester_runners::docker::{DockerRunner, DockerSettings};
use cdtester_runners::local::{LocalOptions, LocalRunner};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown runner {name:?}; available: {known}")]
    Unknown { name: String, known: String },
    #[error("runner {name:?} is unavailable: {reason}")]
    Unavailable { name: String, reason: String },
}

/// Runners by name. A runner that failed to start is remembered with the reason, so selecting it
/// gives that reason instead of "unknown".
#[derive(Default)]
pub struct Registry {
    runners: BTreeMap<String, Arc<dyn Runner>>,
    unavailable: BTreeMap<String, String>,
}

/// The local runner's options from `runner.local` (venvs default to `<data_dir>/venvs`).
pub fn local_options(config: &Config) -> LocalOptions {
    LocalOptions {
        python: config.runner.local.python.clone(),
        venv_dir: config.runner.local.venv_dir.clone().unwrap_or_else(|| config.node.data_dir.join("venvs")),
        warm: config.runner.local.warm,
        uid: config.runner.local.uid,
        gid: config.runner.local.gid,
        rlimits: config.runner.local.rlimits.clone(),
        wheelhouse: config.runner.wheelhouse.clone(),
    }
}

/// The local runner of `config`, started once the data directory is private (see
/// [`crate::store::make_private`]).
pub fn local_runner(config: &Config) -> Result<LocalRunner, cdtester_runners::local::LocalError> {
    crate::store::make_private(&config.node.data_dir)?;
    LocalRunner::new(local_options(config))
}

/// The docker runner's settings from `runner.docker` (its cache in `<data_dir>/docker`; the node
/// id on its containers' labels is the node's UDP address).
pub fn docker_settings(config: &Config) -> DockerSettings {
    DockerSettings {
        image: config.runner.docker.image.clone(),
        socket: config.runner.docker.socket.clone(),
        node_id: config.node.udp_advertised().to_string(),
        cache_dir: config.node.data_dir.join("docker"),
        python: config.runner.local.python.clone().unwrap_or_else(|| PathBuf::from("python3")),
        limits: config.runner.limits.clone(),
        env_mb: config.runner.docker.env_mb,
        warm: true,
        wheelhouse: config.runner.wheelhouse.clone(),
        mounts: match config.runner.docker.mounts {
            DockerMounts::Auto => MountMode::Auto,
            DockerMounts::Bind => MountMode::Bind,
            DockerMounts::Volume => MountMode::Volume,
        },
    }
}

impl Registry {
    /// The built-in runners the configuration allows on this machine.
    pub fn from_config(config: &Config) -> Registry {
        let mut reg = Registry::default();
        match local_runner(config) {
            Ok(local) => reg.insert(Arc::new(local)),
            Err(e) => reg.mark_unavailable("local", e.to_string()),
        }
        match DockerRunner::new(docker_settings(config)) {
            Ok(docker) => reg.insert(Arc::new(docker)),
            Err(e) => reg.mark_unavailable("docker", e.to_string()),
        }
        // Native runner plugins ([[plugins.native]]): sha256 pin and ABI checked, never unloaded.
        for plugin in &config.plugins.native {
            match cdtester_plugins::load_native_runner(plugin) {
                Ok(runner) => reg.insert(Arc::new(runner)),
                Err(e) => reg.mark_unavailable(&plugin.name, e.to_string()),
            }
        }
        reg
    }

    pub fn insert(&mut self, runner: Arc<dyn Runner>) {
        self.unavailable.remove(runner.name());
        self.runners.insert(runner.name().to_string(), runner);
    }

    pub fn mark_unavailable(&mut self, name: &str, reason: String) {
        tracing::warn!(runner = name, %reason, "runner unavailable");
        self.unavailable.insert(name.to_string(), reason);
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn Runner>, RegistryError> {
        if let Some(r) = self.runners.get(name) {
            return Ok(Arc::clone(r));
        }
        if let Some(reason) = self.unavailable.get(name) {
            return Err(RegistryError::Unavailable { name: name.into(), reason: reason.clone() });
        }
        let known = self.names().join(", ");
        Err(RegistryError::Unknown {
            name: name.into(),
            known: if known.is_empty() { "none".into() } else { known },
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.runners.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unavailable_runners_are_explained() {
        let mut reg = Registry::default();
        reg.mark_unavailable("docker", "no engine".into());
        let err = reg.get("docker").err().unwrap().to_string();
        assert!(err.contains("no engine"), "{err}");
        let err = reg.get("nope").err().unwrap().to_string();
        assert!(err.contains("unknown runner") && err.contains("none"), "{err}");
    }

    #[test]
    fn local_options_follow_the_config() {
        let mut cfg = Config::default();
        cfg.node.data_dir = PathBuf::from("/data");
        assert_eq!(local_options(&cfg).venv_dir, PathBuf::from("/data/venvs"));
        cfg.runner.local.venv_dir = Some(PathBuf::from("/v"));
        cfg.runner.local.warm = false;
        let o = local_options(&cfg);
        assert_eq!(o.venv_dir, PathBuf::from("/v"));
        assert!(!o.warm);
    }
}
