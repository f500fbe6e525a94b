//! Configuration loading for cdtester.
//!
//! Sources, lowest priority first: built-in defaults, a TOML file (`--config FILE`, default
//! `cdtester.toml` if it exists), then `CDT_*` environment variables where `__` separates nesting
//! levels (`CDT_NODE__BIND=127.0.0.1:7001`, `CDT_RUNNER__LIMITS__TIMEOUT_S=30`). Unknown keys and
//! ill-typed values are rejected with the offending key named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cdtester_runner_api::{Limits, Rlimits};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub timers: Timers,
    pub runner: RunnerConfig,
    /// Per-project rules, first match wins.
    pub projects: Vec<ProjectRule>,
    pub plugins: PluginsConfig,
    pub intake: IntakeConfig,
    pub grading: GradingConfig,
}

/// Most times a failed module may be run again (`runner.retries`, a rule's `retries`).
pub const MAX_RETRIES: u32 = cdtester_runner_api::MAX_ATTEMPTS as u32 - 1;

/// How grades count what is not a plain pass or failure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradingConfig {
    /// How a flaky test (failed, then passed when its module was run again) counts in grades.
    pub flaky: FlakyGrade,
}

/// `grading.flaky`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlakyGrade {
    /// As a pass (the default: retries are there to forgive what fails by chance).
    #[default]
    Pass,
    /// As a failure.
    Fail,
}

/// Where the node listens and whom it joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Local UDP address of the peer protocol (`0.0.0.0:PORT` or `[::]:PORT` listens on every
    /// interface).
    pub bind: SocketAddr,
    /// HTTP API address to listen on.
    pub http: SocketAddr,
    /// UDP `ip:port` peers reach this node at: its identity in the protocol, `/network` and
    /// `/stats` (a published or forwarded port behind NAT). Unset: `bind`, or, when `bind` has an
    /// unspecified IP, the address of the interface that routes to the join target (or to the
    /// internet), with the bound port. Port 0: the bound port.
    pub advertise: Option<SocketAddr>,
    /// HTTP `ip:port` peers and clients reach the API at. Unset: `http`, or, when `http` has
    /// an unspecified IP, the advertised UDP IP with the bound HTTP port. Port 0: the bound port.
    pub http_advertise: Option<SocketAddr>,
    /// UDP address of any member of an existing network; none starts a new network.
    pub join: Option<SocketAddr>,
    /// Durable state (results, stats, project cache).
    pub data_dir: PathBuf,
    /// Shared cluster secret: every datagram and internal HTTP call is authenticated with it.
    /// A node that starts a network without one generates one (kept in `<data_dir>/cluster.secret`
    /// and printed with the join command); a joiner must be given it. Never empty.
    pub secret: Option<String>,
    /// Run an open network: no secret, nothing authenticated, anyone who can reach the ports
    /// can join, forge results and evict members. Only for interoperating with nodes of the
    /// earlier implementation on a trusted network; logged loudly.
    pub insecure: bool,
    /// Seconds a prepared project (warm pytest server, container) stays after no unfinished
    /// evaluation uses it; then it is released and its extracted tree removed.
    pub release_after_s: u64,
    /// Stored project archives of finished evaluations are deleted, oldest first, past this
    /// many MiB.
    pub cache_budget_mb: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 7000)),
            http: SocketAddr::from(([127, 0, 0, 1], 8000)),
            advertise: None,
            http_advertise: None,
            join: None,
            data_dir: PathBuf::from("cdtester-data"),
            secret: None,
            insecure: false,
            release_after_s: 30,
            cache_budget_mb: 4096,
        }
    }
}

impl NodeConfig {
    /// The UDP address peers know this node by: `advertise`, else `bind`.
    pub fn udp_advertised(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.bind)
    }

    /// The HTTP address peers and clients use: `http_advertise`, else `http`.
    pub fn http_advertised(&self) -> SocketAddr {
        self.http_advertise.unwrap_or(self.http)
    }
}

/// What clients of the HTTP API may send and how much of the node they may hold: git URL
/// rules, clone and upload caps, and the HTTP server's timeouts and connection cap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IntakeConfig {
    /// Accept local paths and `file://` URLs in `POST /evaluation` (they clone any repository
    /// the node can read, and `GET /file` then serves it): only for trusted clients.
    pub allow_local_urls: bool,
    /// Accept `git://` URLs (unauthenticated, unencrypted) besides `https://`.
    pub allow_git_protocol: bool,
    /// Git URLs per submission.
    pub max_urls: usize,
    /// Wall-clock limit, seconds, for cloning all the repositories of one submission.
    pub clone_timeout_s: u64,
    /// Bytes one clone may download.
    pub max_clone_bytes: u64,
    /// Files (and folders) in one cloned tree or one uploaded zip.
    pub max_files: usize,
    /// Bytes of the files of one cloned tree or one extracted upload.
    pub max_tree_bytes: u64,
    /// Largest upload body, bytes (more is answered 413).
    pub max_upload_bytes: u64,
    /// Largest central directory (the list of entries) of an uploaded zip, bytes.
    pub max_central_dir_bytes: u64,
    /// Submissions of git URLs cloned at the same time (more are answered 503).
    pub max_concurrent_clones: usize,
    /// Uploads received and extracted at the same time (more are answered 503).
    pub max_concurrent_uploads: usize,
    /// Seconds a client has to send a request's headers (also the keep-alive idle limit).
    pub header_timeout_s: u64,
    /// Seconds an upload body may stall (no byte received) before the request is dropped.
    pub body_idle_timeout_s: u64,
    /// Open HTTP connections; at the cap the oldest connection with no request in progress is
    /// closed to make room.
    pub max_connections: usize,
    /// Evaluations one client (an IP address, an IPv6 /64) may have submitted through this node
    /// (rerun included) that have not finished; more are answered 429.
    pub max_pending_per_client: usize,
    /// Event streams (`GET /evaluation/{id}/events`) one client may hold open; more are answered 429.
    pub max_streams_per_client: usize,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            allow_local_urls: false,
            allow_git_protocol: false,
            max_urls: 16,
            clone_timeout_s: 120,
            max_clone_bytes: 256 * 1024 * 1024,
            max_files: 50_000,
            max_tree_bytes: 512 * 1024 * 1024,
            max_upload_bytes: 256 * 1024 * 1024,
            max_central_dir_bytes: 16 * 1024 * 1024,
            max_concurrent_clones: 4,
            max_concurrent_uploads: 4,
            header_timeout_s: 10,
            body_idle_timeout_s: 30,
            max_connections: 512,
            max_pending_per_client: 16,
            max_streams_per_client: 8,
        }
    }
}

/// Protocol timers, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timers {
    /// Period of HEARTBEAT to every peer.
    pub heartbeat_ms: u64,
    /// Silence after which a peer is declared failed.
    pub failure_timeout_ms: u64,
    /// Period of CACHE_UPDATE to every peer.
    pub cache_update_ms: u64,
    /// Period of TASK_ANNOUNCE while this node has queued tasks.
    pub task_announce_ms: u64,
    /// How long a TASK_SEND waits for its TASK_CONFIRM before the task is requeued.
    pub confirm_timeout_ms: u64,
    /// How long an election waits for RECOVERY_ELECTION_REP answers.
    pub election_timeout_ms: u64,
    /// How long a failed member still counts when a result needs a majority of the members to
    /// be stored. Longer protects against split decisions in longer network partitions (a node
    /// cut off alone counts itself a majority only after this); shorter lets a network that lost
    /// half of its members (1 of 2 alive) carry on sooner.
    pub quorum_hold_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            heartbeat_ms: 500,
            failure_timeout_ms: 2000,
            cache_update_ms: 1000,
            task_announce_ms: 300,
            confirm_timeout_ms: 1000,
            election_timeout_ms: 500,
            quorum_hold_ms: 30_000,
        }
    }
}

/// Which runner runs projects and with what limits, unless a project rule says otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    /// Runner for projects no rule matches.
    pub default: String,
    /// Tasks this node runs at the same time.
    pub workers: usize,
    pub limits: Limits,
    /// Times a module with a failed (or errored) test is run again on the worker, at most
    /// [`MAX_RETRIES`]; a test that fails and then passes is reported `flaky`.
    pub retries: u32,
    pub local: LocalRunnerConfig,
    pub docker: DockerRunnerConfig,
    /// A directory of wheels (made by `cdtester env prepare`) that environments are built from
    /// instead of the package index: pip gets `--no-index --find-links <dir>` for every build, so
    /// a host without access to the index still builds them. Default: none (the index is used).
    pub wheelhouse: Option<PathBuf>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            default: "local".into(),
            workers: 2,
            limits: Limits::default(),
            retries: 0,
            local: LocalRunnerConfig::default(),
            docker: DockerRunnerConfig::default(),
            wheelhouse: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalRunnerConfig {
    /// Python interpreter used to make venvs; default: the first `python3` on PATH, resolved once.
    pub python: Option<PathBuf>,
    /// Where per-project virtual environments are cached; default `<data_dir>/venvs`.
    pub venv_dir: Option<PathBuf>,
    /// Fork each module's pytest run from a warm worker that has imported pytest already (same
    /// results as a fresh `python -m pytest <module>`, less start-up); false = fresh interpreters.
    pub warm: bool,
    /// Run projects submitted over HTTP with the local runner even when the node's API listens
    /// beyond loopback (the local runner does not isolate hostile code; see README, Security).
    pub allow_remote_submissions: bool,
    /// User id tests run as when the node runs as root (default 65534, `nobody`); ignored when
    /// the node is not root (tests then keep the node's uid). Must not be 0.
    pub uid: Option<u32>,
    /// Group id tests run as when the node runs as root (default 65534, `nogroup`).
    pub gid: Option<u32>,
    /// Resource limits (setrlimit) of every test process.
    pub rlimits: Rlimits,
}

impl Default for LocalRunnerConfig {
    fn default() -> Self {
        LocalRunnerConfig {
            python: None,
            venv_dir: None,
            warm: true,
            uid: None,
            gid: None,
            rlimits: Rlimits::default(),
            allow_remote_submissions: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerRunnerConfig {
    /// Image the docker runner uses (built by `cdtester image build`).
    pub image: String,
    /// Docker engine socket; default: the engine's default (DOCKER_HOST or /var/run/docker.sock).
    pub socket: Option<String>,
    /// Cap in MiB on a project's environment: the wheels downloaded for it on the host, the
    /// tmpfs its (network-less) build writes to, and the result kept on the host. The build's
    /// container may use this much memory on top of `runner.limits.memory_mb`.
    pub env_mb: u64,
    /// How project files, environments and the plugin reach test containers: `bind` mounts of
    /// this node's paths (the node runs on the engine's host), `volume` (copied into named
    /// volumes through the engine's API: the node runs in a container itself, with the engine's
    /// socket mounted), or `auto` (volumes when this node runs in a container).
    pub mounts: DockerMounts,
}

/// `runner.docker.mounts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DockerMounts {
    Auto,
    Bind,
    Volume,
}

impl Default for DockerRunnerConfig {
    fn default() -> Self {
        DockerRunnerConfig {
            image: "cdtester-runner:latest".into(),
            socket: None,
            env_mb: 512,
            mounts: DockerMounts::Auto,
        }
    }
}

/// A per-project rule: the first rule whose `pattern` matches the project's name or URL applies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectRule {
    /// Glob matched against the project name and its URL (`*` matches any text, also `/`).
    pub pattern: String,
    /// Runner for matching projects.
    #[serde(default)]
    pub runner: Option<String>,
    /// Overrides of the default limits.
    #[serde(default)]
    pub limits: Option<LimitsOverride>,
    /// Names of WASM policy plugins consulted for matching projects, in order.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Extra pip requirements installed before running (e.g. test-only dependencies).
    #[serde(default)]
    pub requirements: Vec<String>,
    /// Overrides `runner.retries` for matching projects.
    #[serde(default)]
    pub retries: Option<u32>,
}

/// Limits a rule may override; unset fields keep the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsOverride {
    pub timeout_s: Option<u64>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub output_kib: Option<u64>,
    pub tmpfs_mb: Option<u64>,
}

impl LimitsOverride {
    pub fn apply(&self, base: &Limits) -> Limits {
        Limits {
            timeout_s: self.timeout_s.unwrap_or(base.timeout_s),
            memory_mb: self.memory_mb.unwrap_or(base.memory_mb),
            cpus: self.cpus.unwrap_or(base.cpus),
            pids: self.pids.unwrap_or(base.pids),
            output_kib: self.output_kib.unwrap_or(base.output_kib),
            tmpfs_mb: self.tmpfs_mb.unwrap_or(base.tmpfs_mb),
        }
    }
}

/// Plugins to load at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    pub wasm: Vec<WasmPluginConfig>,
    pub native: Vec<NativePluginConfig>,
    /// When a policy plugin fails (trap, fuel, bad output, unknown name) during admission or
    /// runner choice: refuse the project (true, the default) or go on to the next policy and
    /// then the configured default (false).
    pub fail_closed: bool,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig { wasm: Vec::new(), native: Vec::new(), fail_closed: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmPluginConfig {
    pub name: String,
    pub path: PathBuf,
    /// Hex sha256 the file must have; a mismatch refuses the plugin.
    pub sha256: String,
    /// Fuel per call (instructions, roughly).
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// Linear memory cap per call, MiB.
    #[serde(default = "default_plugin_memory_mb")]
    pub memory_mb: u64,
}

fn default_fuel() -> u64 {
    50_000_000
}

fn default_plugin_memory_mb() -> u64 {
    16
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativePluginConfig {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// The effective settings for one project after applying the first matching rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectSettings {
    pub runner: String,
    /// The runner comes from a rule that matched the project's name only (a name the submitter
    /// chose), not its URL.
    pub runner_by_name: bool,
    pub limits: Limits,
    pub policies: Vec<String>,
    pub requirements: Vec<String>,
    /// Times a module with failed tests is run again (`runner.retries` or the rule's).
    pub retries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// `CDT_*` variables that are not configuration keys (after the prefix, case-insensitive).
const NON_CONFIG_VARS: &[&str] = &["log", "config", "git_token", "corpus_cache", "test_cache"];

impl Config {
    /// Loads defaults < `file` (if given; it must exist) < `CDT_*` environment variables.
    /// `CDT_LOG`, `CDT_CONFIG` and `CDT_GIT_TOKEN` are command-line settings, not config keys;
    /// `CDT_CORPUS_CACHE` and `CDT_TEST_CACHE` are cache folders of the tests and benchmarks.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, Env::prefixed("CDT_").ignore(NON_CONFIG_VARS).split("__"))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        let fig = fig.merge(env);
        let cfg: Config = fig.extract().map_err(|e| ConfigError::Invalid(describe(&e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key}: {why}")));
        if self.node.secret.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return bad("node.secret", "is empty: remove it to have one generated, or set a real secret");
        }
        if self.node.insecure && self.node.secret.is_some() {
            return bad("node.insecure", "contradicts node.secret: an insecure network has no secret");
        }
        for (key, addr) in
            [("node.advertise", self.node.advertise), ("node.http_advertise", self.node.http_advertise)]
        {
            if addr.is_some_and(|a| a.ip().is_unspecified() || a.ip().is_multicast()) {
                return bad(key, "must be an address peers can reach (not 0.0.0.0, [::] or multicast)");
            }
        }
        if self.node.join.is_some_and(|j| j.ip().is_unspecified() || j.port() == 0) {
            return bad(
                "node.join",
                "must be a member's address (an IP that is not 0.0.0.0 or [::], a port that is not 0)",
            );
        }
        if self.runner.workers == 0 {
            return bad("runner.workers", "must be at least 1");
        }
        if self.runner.limits.timeout_s == 0 {
            return bad("runner.limits.timeout_s", "must be at least 1");
        }
        let i = &self.intake;
        for (key, value) in [
            ("intake.max_urls", i.max_urls as u64),
            ("intake.clone_timeout_s", i.clone_timeout_s),
            ("intake.max_clone_bytes", i.max_clone_bytes),
            ("intake.max_files", i.max_files as u64),
            ("intake.max_tree_bytes", i.max_tree_bytes),
            ("intake.max_upload_bytes", i.max_upload_bytes),
            ("intake.max_central_dir_bytes", i.max_central_dir_bytes),
            ("intake.max_concurrent_clones", i.max_concurrent_clones as u64),
            ("intake.max_concurrent_uploads", i.max_concurrent_uploads as u64),
            ("intake.header_timeout_s", i.header_timeout_s),
            ("intake.body_idle_timeout_s", i.body_idle_timeout_s),
            ("intake.max_connections", i.max_connections as u64),
            ("intake.max_pending_per_client", i.max_pending_per_client as u64),
            ("intake.max_streams_per_client", i.max_streams_per_client as u64),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.timers.failure_timeout_ms <= self.timers.heartbeat_ms {
            return bad("timers.failure_timeout_ms", "must be larger than timers.heartbeat_ms");
        }
        if self.timers.quorum_hold_ms < self.timers.failure_timeout_ms {
            return bad("timers.quorum_hold_ms", "must be at least timers.failure_timeout_ms");
        }
        if self.runner.retries > MAX_RETRIES {
            return bad("runner.retries", &format!("must be at most {MAX_RETRIES}"));
        }
        for (i, rule) in self.projects.iter().enumerate() {
            if let Err(e) = glob::Pattern::new(&rule.pattern) {
                return bad(&format!("projects[{i}].pattern"), &e.to_string());
            }
            if rule.retries.is_some_and(|r| r > MAX_RETRIES) {
                return bad(&format!("projects[{i}].retries"), &format!("must be at most {MAX_RETRIES}"));
            }
        }
        let wasm =
            self.plugins.wasm.iter().enumerate().map(|(i, p)| (format!("plugins.wasm[{i}]"), &p.sha256));
        let native =
            self.plugins.native.iter().enumerate().map(|(i, p)| (format!("plugins.native[{i}]"), &p.sha256));
        for (key, sha) in wasm.chain(native) {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(&format!("{key}.sha256"), "must be 64 hex digits");
            }
        }
        Ok(())
    }

    /// Settings for a project named `name` (and fetched from `url`, if any).
    pub fn project_settings(&self, name: &str, url: Option<&str>) -> ProjectSettings {
        let rule = self.projects.iter().find(|r| {
            glob::Pattern::new(&r.pattern)
                .map(|p| p.matches(name) || url.is_some_and(|u| p.matches(u)))
                .unwrap_or(false)
        });
        let by_url = rule
            .is_some_and(|r| url.is_some_and(|u| glob::Pattern::new(&r.pattern).is_ok_and(|p| p.matches(u))));
        ProjectSettings {
            runner: rule.and_then(|r| r.runner.clone()).unwrap_or_else(|| self.runner.default.clone()),
            runner_by_name: rule.is_some_and(|r| r.runner.is_some()) && !by_url,
            limits: rule
                .and_then(|r| r.limits.as_ref())
                .map(|o| o.apply(&self.runner.limits))
                .unwrap_or_else(|| self.runner.limits.clone()),
            policies: rule.map(|r| r.policies.clone()).unwrap_or_default(),
            requirements: rule.map(|r| r.requirements.clone()).unwrap_or_default(),
            retries: rule.and_then(|r| r.retries).unwrap_or(self.runner.retries),
        }
    }
}

/// A figment error as one line that names the key path and what was wrong with it.
fn describe(err: &figment::Error) -> String {
    err.clone()
        .into_iter()
        .map(|e| {
            let key = if e.path.is_empty() { String::from("<root>") } else { e.path.join(".") };
            let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            format!("{key}: {}{source}", e.kind)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
// figment's `Jail` closures must return `figment::Error`, which is large; that is its API.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail(toml: Option<&str>) -> Result<Config, ConfigError> {
        let file = toml.map(|_| PathBuf::from("cdtester.toml"));
        Config::load(file.as_deref())
    }

    #[test]
    fn defaults_file_and_env_layer_in_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "cdtester.toml",
                r#"
                [node]
                bind = "127.0.0.1:7100"
                http = "127.0.0.1:8100"
                [runner.limits]
                timeout_s = 30
                "#,
            )?;
            jail.set_env("CDT_NODE__HTTP", "127.0.0.1:8200");
            jail.set_env("CDT_RUNNER__WORKERS", "4");
            jail.set_env("CDT_LOG", "debug");
            jail.set_env("CDT_CONFIG", "cdtester.toml");
            let cfg = load_in_jail(Some("")).map_err(|e| e.to_string())?;
            assert_eq!(cfg.node.bind.port(), 7100);
            assert_eq!(cfg.node.http.port(), 8200);
            assert_eq!(cfg.runner.workers, 4);
            assert_eq!(cfg.runner.limits.timeout_s, 30);
            assert_eq!(cfg.runner.limits.memory_mb, Limits::default().memory_mb);
            Ok(())
        });
    }

    #[test]
    fn unknown_and_ill_typed_keys_are_named() {
        Jail::expect_with(|jail| {
            for (toml, key) in [
                ("[runner]\nworkerz = 3\n", "workerz"),
                ("[runner.limits]\ntimeout_s = \"soon\"\n", "runner.limits.timeout_s"),
                ("[runner]\nworkers = 0\n", "runner.workers"),
                ("[runner]\nretries = 6\n", "runner.retries"),
                ("[grading]\nflaky = \"maybe\"\n", "grading.flaky"),
            ] {
                jail.create_file("cdtester.toml", toml)?;
                let err = load_in_jail(Some("")).unwrap_err().to_string();
                assert!(err.contains(key), "{err}");
            }
            jail.create_file("cdtester.toml", "[grading]\nflaky = \"fail\"\n[runner]\nretries = 2\n")?;
            let cfg = load_in_jail(Some("")).map_err(|e| e.to_string())?;
            assert_eq!((cfg.grading.flaky, cfg.runner.retries), (FlakyGrade::Fail, 2));
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/cdtester.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::MissingFile(_)));
    }

    #[test]
    fn first_matching_rule_wins_and_overrides_limits() {
        let cfg = Config {
            projects: vec![
                ProjectRule {
                    pattern: "*github.com/untrusted/*".into(),
                    runner: Some("docker".into()),
                    limits: Some(LimitsOverride { timeout_s: Some(10), ..Default::default() }),
                    policies: vec!["p".into()],
                    requirements: vec![],
                    retries: Some(2),
                },
                ProjectRule {
                    pattern: "*".into(),
                    runner: None,
                    limits: None,
                    policies: vec![],
                    requirements: vec!["hypothesis".into()],
                    retries: None,
                },
            ],
            runner: RunnerConfig { retries: 1, ..Default::default() },
            ..Default::default()
        };
        let s = cfg.project_settings("repo", Some("https://github.com/untrusted/repo"));
        assert_eq!((s.runner.as_str(), s.retries), ("docker", 2));
        assert!(!s.runner_by_name, "matched by URL");
        let s = cfg.project_settings("x-github.com/untrusted/y", None);
        assert!(s.runner_by_name, "a name chosen to look like the URL only matches by name");
        assert_eq!(s.limits.timeout_s, 10);
        assert_eq!(s.limits.memory_mb, cfg.runner.limits.memory_mb);
        let s = cfg.project_settings("calc", None);
        assert_eq!(
            (s.runner.as_str(), s.retries),
            ("local", 1),
            "runner.retries where the rule says nothing"
        );
        assert_eq!(s.requirements, vec!["hypothesis".to_string()]);
    }

    #[test]
    fn advertise_keys_take_ipv4_and_ipv6_and_refuse_unreachable_addresses() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "cdtester.toml",
                "[node]\nbind = \"[::]:7000\"\nadvertise = \"[2001:db8::7]:7100\"\n",
            )?;
            jail.set_env("CDT_NODE__HTTP_ADVERTISE", "192.0.2.7:8100");
            jail.set_env("CDT_NODE__JOIN", "[2001:db8::1]:7000");
            let cfg = load_in_jail(Some("")).map_err(|e| e.to_string())?;
            assert!(cfg.node.bind.ip().is_unspecified());
            assert_eq!(cfg.node.advertise, Some("[2001:db8::7]:7100".parse().expect("addr")));
            assert_eq!(cfg.node.http_advertise, Some("192.0.2.7:8100".parse().expect("addr")));
            assert_eq!(cfg.node.join, Some("[2001:db8::1]:7000".parse().expect("addr")));
            jail.set_env("CDT_NODE__ADVERTISE", "0.0.0.0:7100");
            let err = load_in_jail(Some("")).unwrap_err().to_string();
            assert!(err.contains("node.advertise"), "{err}");
            jail.set_env("CDT_NODE__ADVERTISE", "192.0.2.7:7100");
            jail.set_env("CDT_NODE__HTTP_ADVERTISE", "[::]:8100");
            let err = load_in_jail(Some("")).unwrap_err().to_string();
            assert!(err.contains("node.http_advertise"), "{err}");
            jail.set_env("CDT_NODE__HTTP_ADVERTISE", "192.0.2.7:8100");
            jail.set_env("CDT_NODE__JOIN", "0.0.0.0:7000");
            let err = load_in_jail(Some("")).unwrap_err().to_string();
            assert!(err.contains("node.join"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cdtester.toml");
        Config::load_from(Some(&path), Env::prefixed("CDT_TEST_NOTHING_")).expect("example config loads");
    }
}
