//! The `docker` runner: pytest for untrusted projects, in locked-down containers (bollard).
//!
//! * **Image**: `cdtester image build` ([`image::build_image`]) makes `cdtester-runner:latest`
//!   offline (debootstrap + pinned pytest wheels, no registry).
//! * **Prepare**: the project is copied to the runner's cache (readable by the container user;
//!   the copy's hash is the project's content hash) and, if it needs one, a Python environment is
//!   made for it without network (see [`env`]).
//! * **Containers**: one per (project, node, limits), created on first use, reused by every
//!   module of the project that this node runs (one `exec` per module), and kept in an idle pool
//!   between tasks. A container is discarded instead of reused when its module timed out (the
//!   whole container is removed: that is the wall-clock kill), was OOM-killed, or left processes
//!   behind. See [`sandbox`] for the profile (network none, memory = memory+swap, pids, CPU,
//!   read-only root, tmpfs, cap-drop ALL, no-new-privileges, uid 65534, init, log cap).
//! * **Results**: the shared pytest plugin writes its records to the exec's stderr; they are
//!   parsed by [`crate::pytest`], exactly as the local runner does. The runner adds the verdicts
//!   only a sandbox can tell: `oom` (the cgroup's OOM-kill counter went up), `timeout`,
//!   `crashed`, and `infra-error` when the engine fails under a module.
//! * **Cleanup**: containers carry `cdtester.node=<node id>` and `cdtester.project=<id>` labels.
//!   [`Runner::release`] removes a project's containers, [`DockerRunner::shutdown`] every
//!   container of the node, and [`cleanup_orphans`] (run by [`DockerRunner::new`]) those a
//!   crashed node with the same id left behind.

pub mod env;
pub mod image;
pub mod sandbox;
pub mod volumes;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use cdtester_runner_api::requirement::{self, Requirement};
use cdtester_runner_api::{
    Limits, ModuleReport, Outcome, PreparedProject, ProjectSource, Runner, RunnerError, TaskReport, TaskSpec,
    TestResult, round2,
};

use crate::pytest::{self, Mode, RunEnd};
use crate::wheelhouse::PackageSource;
use sandbox::{Bind, LABEL_NODE, LABEL_OWNER, LABEL_PROJECT, Sandbox, SandboxSpec};
use volumes::{MountMode, Source, Volumes};

pub use image::{ImageBuildOptions, ImageBuilt, build_image};

/// Interpreter inside the image.
const PYTHON: &str = "/usr/bin/python3";
/// Where the reporting plugin and the warm worker are mounted.
const PLUGIN_MOUNT: &str = "/opt/cdtester";
/// The warm worker shared with the local runner.
const FORKSERVER_SOURCE: &str = include_str!("../../python/cdtester_forkserver.py");
const FORKSERVER_FILE: &str = "cdtester_forkserver.py";
/// Where a project's prepared environment is mounted.
const ENV_MOUNT: &str = "/env";
/// Where the project's (read-only) files are mounted; they are copied to the work dir.
const SRC_MOUNT: &str = "/src";
/// Making an environment (pip builds) gets at least this long; so does each `pip download`.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// Environment builds: the project copy (read-only), the downloaded wheels (read-only), and
/// where pip installs, in the container's size-capped tmpfs (the wrapper keeps the work dir).
const BUILD_PROJECT: &str = "/project";
const BUILD_WHEELS: &str = "/wheels";
const BUILD_ENV: &str = "/tmp/work/env";

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker engine: {context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("runner image: {0}")]
    Image(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl DockerError {
    pub(crate) fn engine(context: &str, source: bollard::errors::Error) -> DockerError {
        DockerError::Engine { context: context.to_string(), source }
    }
}

impl From<DockerError> for RunnerError {
    fn from(e: DockerError) -> RunnerError {
        match e {
            DockerError::Io(io) => RunnerError::Io(io),
            other => RunnerError::Infra(other.to_string()),
        }
    }
}

/// Connects to the engine (`socket`, or DOCKER_HOST / the default socket) and agrees on an API
/// version both sides speak.
pub async fn connect(socket: Option<&str>) -> Result<Docker, DockerError> {
    let docker = match socket {
        Some(path) => Docker::connect_with_socket(path, 120, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_local_defaults(),
    }
    .map_err(|e| DockerError::engine("connecting", e))?;
    docker.negotiate_version().await.map_err(|e| DockerError::engine("negotiating the API version", e))
}

/// Removes the containers labelled as belonging to `node_id` whose owning process is gone (a
/// node that crashed or was killed); containers of a live process using the same node id are
/// left alone. Returns how many were removed.
pub async fn cleanup_orphans(docker: &Docker, node_id: &str) -> Result<usize, DockerError> {
    let found = sandbox::labelled(docker, LABEL_NODE, node_id).await?;
    let mut removed = 0;
    for (id, labels) in &found {
        if labels.get(LABEL_OWNER).is_some_and(|o| sandbox::owner_alive(o)) {
            continue;
        }
        sandbox::remove(docker, id).await;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(node = %node_id, removed, "removed runner containers left by a dead process");
    }
    Ok(removed)
}

/// Removes every container this process made (for `node_id`); returns how many.
async fn remove_own(docker: &Docker, node_id: &str) -> Result<usize, DockerError> {
    let found = sandbox::labelled(docker, LABEL_OWNER, sandbox::owner_id()).await?;
    let mut removed = 0;
    for (id, labels) in &found {
        if labels.get(LABEL_NODE).map(String::as_str) == Some(node_id) {
            sandbox::remove(docker, id).await;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What the docker runner needs to know.
#[derive(Debug, Clone)]
pub struct DockerSettings {
    /// Image to run (`runner.docker.image`).
    pub image: String,
    /// Engine socket (`runner.docker.socket`); `None` = the engine's default.
    pub socket: Option<String>,
    /// This node's id, put on every container's `cdtester.node` label.
    pub node_id: String,
    /// Host directory for project copies, environments and the plugin.
    pub cache_dir: PathBuf,
    /// Host interpreter with pip, used only to download wheels.
    pub python: PathBuf,
    /// Limits for discovery and environment builds (runs get theirs per task).
    pub limits: Limits,
    /// Cap on a project's environment (`runner.docker.env_mb`): the wheels downloaded for it,
    /// the build's tmpfs (so everything its build backend writes), and the unpacked result.
    pub env_mb: u64,
    /// Fork each module from a warm pytest worker in the container (the local runner's fork
    /// server) instead of starting a fresh interpreter per module; falls back to a fresh one
    /// whenever the worker is unavailable.
    pub warm: bool,
    /// Wheels environments are downloaded from instead of the index (`runner.wheelhouse`).
    pub wheelhouse: Option<PathBuf>,
    /// How directories reach containers (`runner.docker.mounts`; see [`volumes`]).
    pub mounts: MountMode,
}

struct Project {
    prepared: PreparedProject,
    /// The project's files (mounted read-only at `/src`).
    copy: PathBuf,
    /// Directory holding `copy`, removed on release.
    holder: PathBuf,
    env: Option<PathBuf>,
    idle: Mutex<Vec<Sandbox>>,
}

/// The `docker` runner.
pub struct DockerRunner {
    /// Drives bollard for the blocking Runner calls; only `Drop` takes it.
    rt: Option<tokio::runtime::Runtime>,
    docker: Docker,
    settings: DockerSettings,
    image_id: String,
    python_version: String,
    source: PackageSource,
    /// The volumes directories are copied into, when the engine cannot see this process's paths.
    volumes: Option<Volumes>,
    plugin_dir: PathBuf,
    projects: Mutex<HashMap<String, Arc<Project>>>,
}

impl DockerRunner {
    /// Connects to the engine, checks the image is there, and removes containers a previous
    /// process with the same node id left behind.
    pub fn new(mut settings: DockerSettings) -> Result<DockerRunner, DockerError> {
        // Bind mounts need absolute host paths.
        std::fs::create_dir_all(&settings.cache_dir)?;
        settings.cache_dir = std::fs::canonicalize(&settings.cache_dir)?;
        let source = PackageSource::new(settings.wheelhouse.as_deref())
            .map_err(|e| DockerError::Command { what: "runner.wheelhouse".into(), detail: e.to_string() })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cdtester-docker")
            .enable_all()
            .build()?;
        let (docker, image_id, python_version) = rt.block_on(async {
            let docker = connect(settings.socket.as_deref()).await?;
            let image = docker.inspect_image(&settings.image).await.map_err(|e| {
                DockerError::Image(format!(
                    "{} is not available ({e}); build it with `cdtester image build`",
                    settings.image
                ))
            })?;
            let python = image
                .config
                .as_ref()
                .and_then(|c| c.labels.as_ref())
                .and_then(|l| l.get(image::PYTHON_LABEL).cloned())
                .unwrap_or_else(|| image::PYTHON_VERSION.to_string());
            cleanup_orphans(&docker, &settings.node_id).await?;
            volumes::remove_labelled(&docker, &settings.node_id, sandbox::owner_alive).await?;
            Ok::<_, DockerError>((docker, image.id.unwrap_or_default(), python))
        })?;
        let volumes = settings.mounts.uses_volumes().then(Volumes::default);
        if volumes.is_some() {
            tracing::info!(
                "docker runner: directories reach containers through volumes (runner.docker.mounts)"
            );
        }
        let plugin_dir = pytest::install_plugin(&settings.cache_dir.join("plugin"))?;
        let server = plugin_dir.join(FORKSERVER_FILE);
        if std::fs::read_to_string(&server).ok().as_deref() != Some(FORKSERVER_SOURCE) {
            let tmp = plugin_dir.join(format!(".{FORKSERVER_FILE}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, FORKSERVER_SOURCE)?;
            std::fs::rename(&tmp, &server)?;
        }
        Ok(DockerRunner {
            rt: Some(rt),
            docker,
            settings,
            image_id,
            python_version,
            source,
            volumes,
            plugin_dir,
            projects: Mutex::new(HashMap::new()),
        })
    }

    fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        match &self.rt {
            Some(rt) => rt.block_on(fut),
            None => unreachable!("the runtime is only taken when the runner is dropped"),
        }
    }

    /// Removes every container of this node and forgets every project (node shutdown).
    pub fn shutdown(&self) {
        let projects: Vec<Arc<Project>> = self.lock_projects().drain().map(|(_, p)| p).collect();
        for p in &projects {
            let _ = std::fs::remove_dir_all(&p.holder);
        }
        if let Err(e) = self.block_on(self.remove_everything()) {
            tracing::warn!(error = %e, "could not remove this node's containers");
        }
    }

    fn lock_projects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Project>>> {
        self.projects.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn project(&self, id: &str) -> Result<Arc<Project>, RunnerError> {
        self.lock_projects().get(id).cloned().ok_or_else(|| RunnerError::UnknownProject(id.to_string()))
    }

    fn spec(&self, project: &Project, limits: &Limits) -> SandboxSpec {
        let mut binds = vec![
            Bind { source: Source::Host(project.copy.clone()), container: SRC_MOUNT.into(), read_only: true },
            Bind {
                source: Source::Host(self.plugin_dir.clone()),
                container: PLUGIN_MOUNT.into(),
                read_only: true,
            },
        ];
        let mut path = PLUGIN_MOUNT.to_string();
        if let Some(env) = &project.env {
            binds.push(Bind {
                source: Source::Host(env.clone()),
                container: ENV_MOUNT.into(),
                read_only: true,
            });
            path.push(':');
            path.push_str(ENV_MOUNT);
        }
        SandboxSpec {
            image: self.settings.image.clone(),
            node_id: self.settings.node_id.clone(),
            project_id: project.prepared.id.clone(),
            limits: limits.clone(),
            binds,
            env: base_env(Some(&path)),
        }
    }

    async fn checkout(&self, project: &Project, limits: &Limits) -> Result<Sandbox, DockerError> {
        let reused = {
            let mut idle = project.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.iter().position(|s| s.limits == *limits).map(|i| idle.swap_remove(i))
        };
        match reused {
            Some(s) => Ok(s),
            None => self.start(self.spec(project, limits)).await,
        }
    }

    /// Starts a sandbox for `spec`, its directories first copied into volumes when the engine
    /// cannot see this process's paths.
    async fn start(&self, mut spec: SandboxSpec) -> Result<Sandbox, DockerError> {
        if let Some(volumes) = &self.volumes {
            for bind in &mut spec.binds {
                if let Source::Host(dir) = &bind.source {
                    let name = volumes
                        .volume_of(&self.docker, &self.settings.image, &self.settings.node_id, dir)
                        .await?;
                    bind.source = Source::Volume(name);
                }
            }
        }
        Sandbox::start(&self.docker, &spec).await
    }

    /// Removes the volume holding `dir`, if any.
    async fn forget(&self, dir: &Path) {
        if let Some(volumes) = &self.volumes {
            volumes.forget(&self.docker, dir).await;
        }
    }

    /// Removes this process's containers and volumes of this node.
    async fn remove_everything(&self) -> Result<usize, DockerError> {
        let removed = remove_own(&self.docker, &self.settings.node_id).await?;
        if let Some(volumes) = &self.volumes {
            volumes.clear();
        }
        let mine = sandbox::owner_id();
        volumes::remove_labelled(&self.docker, &self.settings.node_id, |owner| owner != mine).await?;
        Ok(removed)
    }

    fn checkin(&self, project: &Project, sandbox: Sandbox) {
        project.idle.lock().unwrap_or_else(|e| e.into_inner()).push(sandbox);
    }

    async fn run_module(
        &self,
        project: &Project,
        slot: &mut Option<Sandbox>,
        module: &str,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<Vec<ModuleReport>, DockerError> {
        let sandbox = match slot {
            Some(s) => s,
            None => slot.insert(self.checkout(project, limits).await?),
        };
        let args = pytest::pytest_args(Mode::Run, &[module.to_string()]);
        let plugin_env = pytest::plugin_env("stderr", task.chunk);
        let timeout = Duration::from_secs(limits.timeout_s.max(1));
        let warm = if self.settings.warm {
            let server = [PYTHON.to_string(), format!("{PLUGIN_MOUNT}/{FORKSERVER_FILE}")];
            // `pytest_args` starts with `-m pytest`: the worker takes what follows.
            sandbox.run_warm(&self.docker, &server, &args[2..], &plugin_env, timeout, limits.output_kib).await
        } else {
            Ok(None)
        };
        let result = match warm {
            Ok(Some(r)) => Ok(r),
            Ok(None) => {
                let mut cmd = vec![PYTHON.to_string()];
                cmd.extend(args);
                let env: Vec<String> = plugin_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                sandbox.run(&self.docker, &cmd, &env, timeout, limits.output_kib).await
            }
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(s) = slot.take() {
                    sandbox::remove(&self.docker, &s.id).await;
                }
                return Err(e);
            }
        };
        let end = if result.timed_out {
            RunEnd::TimedOut(limits.timeout_s)
        } else {
            match result.exit {
                Some(code) if code >= 128 => RunEnd::Signalled((code - 128) as i32),
                Some(code) => RunEnd::Exited(code as i32),
                None => RunEnd::Signalled(9),
            }
        };
        let records = pytest::parse_records(&result.records);
        let mut reports = pytest::build_reports(&[module.to_string()], &records, &end, task.chunk);
        if result.oom {
            mark_oom(&mut reports, limits.memory_mb);
        }
        let (output, truncated) = result.output.finish();
        for r in &mut reports {
            r.duration = round2(result.elapsed.as_secs_f64());
            r.output_truncated = truncated;
            // As in the local runner: output is kept for modules that did not come out clean.
            if r.counts().failures() > 0 || r.note.is_some() || r.tests.is_empty() {
                r.output = Some(output.clone());
            }
        }
        if result.timed_out || result.oom || result.tainted {
            if let Some(s) = slot.take()
                && !result.timed_out
            {
                sandbox::remove(&self.docker, &s.id).await;
            }
            tracing::debug!(module, timed_out = result.timed_out, oom = result.oom, "container discarded");
        }
        Ok(reports)
    }

    async fn run_task(&self, project: &Project, task: &TaskSpec, limits: &Limits) -> TaskReport {
        let mut slot = None;
        let mut modules = Vec::with_capacity(task.modules.len());
        for module in &task.modules {
            match self.run_module(project, &mut slot, module, task, limits).await {
                Ok(reports) => modules.extend(reports),
                Err(e) => {
                    tracing::warn!(module, error = %e, "docker runner infrastructure failed");
                    modules.push(infra_report(module, &e));
                }
            }
        }
        if let Some(s) = slot {
            self.checkin(project, s);
        }
        TaskReport { modules }
    }

    async fn discover_in(&self, project: &Project) -> Result<Vec<String>, RunnerError> {
        let limits = &self.settings.limits;
        let mut sandbox = self.checkout(project, limits).await?;
        let mut cmd = vec![PYTHON.to_string()];
        cmd.extend(pytest::pytest_args(Mode::Collect, &[]));
        let env: Vec<String> =
            pytest::plugin_env("stderr", None).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let timeout = Duration::from_secs(limits.timeout_s.max(1));
        let result = match sandbox.run(&self.docker, &cmd, &env, timeout, limits.output_kib).await {
            Ok(r) => r,
            Err(e) => {
                sandbox::remove(&self.docker, &sandbox.id).await;
                return Err(e.into());
            }
        };
        if result.timed_out {
            return Err(RunnerError::Discover(format!("collection timed out after {} s", limits.timeout_s)));
        }
        if result.oom || result.tainted {
            sandbox::remove(&self.docker, &sandbox.id).await;
        } else {
            self.checkin(project, sandbox);
        }
        let found = pytest::parse_discovery(&result.records);
        if !found.modules.is_empty() {
            return Ok(found.modules);
        }
        match found.exit {
            Some(0) | Some(5) => Err(RunnerError::NoTests),
            exit => {
                let (output, _) = result.output.finish();
                let tail: String =
                    output.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
                Err(RunnerError::Discover(format!(
                    "pytest --collect-only ended with {:?} (exit status {:?}): {}",
                    exit,
                    result.exit,
                    tail.trim()
                )))
            }
        }
    }

    /// Makes (or finds) the environment `plan` describes for the project copied at `copy`.
    async fn make_env(
        &self,
        plan: &env::EnvPlan,
        project_id: &str,
        copy: &Path,
        content_hash: &str,
    ) -> Result<PathBuf, RunnerError> {
        let envs = self.settings.cache_dir.join("envs");
        let dir = envs.join(plan.key(&self.image_id, content_hash));
        if dir.is_dir() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&envs)?;
        let work = tempfile::Builder::new().prefix(".build-").tempdir_in(&envs)?;
        let wheels = work.path().join("wheels");
        std::fs::create_dir_all(&wheels)?;
        for (what, reqs) in
            [("extra requirements", &plan.requirements), ("build requirements", &plan.build_requires)]
        {
            if !reqs.is_empty() {
                self.download(what, reqs, &wheels, work.path()).await?;
            }
        }
        let env_mb = self.settings.env_mb.max(1);
        let mut limits = self.settings.limits.clone();
        limits.timeout_s = limits.timeout_s.max(PREPARE_TIMEOUT.as_secs());
        // Everything the build writes lives in the tmpfs, whose pages the container is charged.
        limits.tmpfs_mb = env_mb;
        limits.memory_mb = limits.memory_mb.saturating_add(env_mb);
        let spec = SandboxSpec {
            image: self.settings.image.clone(),
            node_id: self.settings.node_id.clone(),
            project_id: project_id.to_string(),
            limits: limits.clone(),
            binds: vec![
                Bind {
                    source: Source::Host(copy.to_path_buf()),
                    container: BUILD_PROJECT.into(),
                    read_only: true,
                },
                Bind {
                    source: Source::Host(wheels.clone()),
                    container: BUILD_WHEELS.into(),
                    read_only: true,
                },
            ],
            env: base_env(None),
        };
        let started = self.start(spec).await;
        let built = match started {
            Ok(mut sandbox) => {
                let built = self.build_in(&mut sandbox, plan, &limits, work.path()).await;
                sandbox::remove(&self.docker, &sandbox.id).await;
                built
            }
            Err(e) => Err(e.into()),
        };
        self.forget(&wheels).await;
        let out = built?;
        match std::fs::rename(&out, &dir) {
            Ok(()) => Ok(dir),
            // Another prepare of the same environment won the race: use theirs.
            Err(_) if dir.is_dir() => Ok(dir),
            Err(e) => Err(e.into()),
        }
    }

    /// `pip download` on the host into `wheels`: wheels only (nothing is built here),
    /// requirements in canonical form after `--`, run in the (empty) destination with its
    /// temporary files in `work` (which holds `wheels`), all of `work` at most `env_mb` MiB, for
    /// at most [`PREPARE_TIMEOUT`].
    async fn download(
        &self,
        what: &str,
        reqs: &[Requirement],
        wheels: &Path,
        work: &Path,
    ) -> Result<(), RunnerError> {
        let cap = self.settings.env_mb.max(1);
        let scratch = tempfile::Builder::new().prefix("pip-tmp-").tempdir_in(work)?;
        let mut cmd = tokio::process::Command::new(&self.settings.python);
        cmd.args(env::download_args(&self.python_version, &self.source, wheels, reqs))
            .current_dir(wheels)
            .env("TMPDIR", scratch.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let run = cmd.spawn()?.wait_with_output();
        tokio::pin!(run);
        let deadline = tokio::time::sleep(PREPARE_TIMEOUT);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let names: Vec<String> = reqs.iter().map(Requirement::to_string).collect();
        let output = loop {
            tokio::select! {
                out = &mut run => break out?,
                _ = &mut deadline => {
                    return Err(RunnerError::Prepare(format!(
                        "downloading the {what} ({}) timed out after {} s",
                        names.join(" "),
                        PREPARE_TIMEOUT.as_secs()
                    )));
                }
                _ = tick.tick() => {
                    if env::dir_size(work)? > cap << 20 {
                        return Err(RunnerError::Prepare(format!(
                            "the {what} ({}) are over {cap} MiB of wheels (runner.docker.env_mb)",
                            names.join(" ")
                        )));
                    }
                }
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(RunnerError::Prepare(self.source.explain(format!(
            "pip download of the {what} ({}) failed; only wheels for CPython {} are used, sdists are \
             never built on the host: {}",
            names.join(" "),
            self.python_version,
            crate::local::tail(stderr.trim(), 1500)
        ))))
    }

    /// Installs `plan` into [`BUILD_ENV`] in `sandbox`, then unpacks it, checked, into
    /// `<work>/env` on the host; returns that directory.
    async fn build_in(
        &self,
        sandbox: &mut Sandbox,
        plan: &env::EnvPlan,
        limits: &Limits,
        work: &Path,
    ) -> Result<PathBuf, RunnerError> {
        let env_mb = limits.tmpfs_mb;
        let pip = |rest: Vec<String>| -> Vec<String> {
            let mut cmd: Vec<String> = [
                PYTHON,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-index",
                "--find-links",
                BUILD_WHEELS,
                "--target",
                BUILD_ENV,
                "--no-warn-script-location",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            cmd.extend(rest);
            cmd
        };
        let mut steps = Vec::new();
        if !plan.requirements.is_empty() {
            steps.push((
                "installing the extra requirements",
                pip(requirement::pip_requirement_args(&plan.requirements)),
            ));
        }
        if plan.install_project {
            // pip builds in-tree: from a writable copy in the tmpfs.
            let copy = format!("{}/project", sandbox::WORK_DIR);
            steps.push((
                "copying the project",
                ["/bin/cp", "-R", BUILD_PROJECT, &copy].map(String::from).to_vec(),
            ));
            steps.push(("installing the project", pip(vec!["--no-deps".into(), "--".into(), copy])));
        }
        let timeout = Duration::from_secs(limits.timeout_s);
        for (what, cmd) in steps {
            let r = sandbox.run(&self.docker, &cmd, &[], timeout, limits.output_kib).await?;
            if r.exit == Some(0) && !r.timed_out {
                continue;
            }
            let (text, _) = r.output.finish();
            if text.contains("No space left on device") {
                return Err(RunnerError::Prepare(format!("{what}: {}", env::OutputError::TooBig(env_mb))));
            }
            let how = if r.timed_out { "timed out".to_string() } else { format!("exit {:?}", r.exit) };
            return Err(RunnerError::Prepare(format!("{what} ({how}): {}", text.trim())));
        }
        let out = work.join("env");
        let caps = env::OutputCaps { mib: env_mb, files: env::MAX_FILES };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let dest = out.clone();
        let unpack = tokio::task::spawn_blocking(move || {
            env::unpack_checked(ChunkReader { rx, chunk: bytes::Bytes::new() }, &dest, caps)
        });
        let exported = sandbox.export_tar(&self.docker, BUILD_ENV, timeout, tx).await;
        let unpacked =
            unpack.await.map_err(|e| RunnerError::Infra(format!("unpacking the environment: {e}")))?;
        match (exported, unpacked) {
            (Ok(_), Ok(())) => Ok(out),
            (_, Err(e)) => Err(RunnerError::Prepare(e.to_string())),
            (Err(e), Ok(())) => Err(e.into()),
        }
    }
}

/// Reads, on a blocking thread, the chunks an async task sends.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    chunk: bytes::Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Environment of every process in a container.
fn base_env(python_path: Option<&str>) -> Vec<String> {
    let mut env = vec![
        "HOME=/tmp".to_string(),
        "LANG=C.UTF-8".into(),
        "PATH=/usr/local/bin:/usr/bin:/bin".into(),
        "PIP_NO_CACHE_DIR=1".into(),
    ];
    if let Some(p) = python_path {
        env.push(format!("PYTHONPATH={p}"));
    }
    env
}

/// The kernel killed the interpreter for memory: tests it left unfinished are `oom`, not `crashed`.
fn mark_oom(reports: &mut [ModuleReport], memory_mb: u64) {
    let why = format!("killed by the OOM killer (memory limit {memory_mb} MiB)");
    for r in reports {
        let mut hit = false;
        for t in &mut r.tests {
            if t.outcome == Outcome::Crashed {
                t.outcome = Outcome::Oom;
                t.message = Some(why.clone());
                hit = true;
            }
        }
        if hit {
            r.note = Some(why.clone());
        }
    }
}

/// A module the runner could not run through no fault of the project.
fn infra_report(module: &str, err: &DockerError) -> ModuleReport {
    let why = err.to_string();
    ModuleReport {
        module: module.to_string(),
        tests: vec![TestResult {
            nodeid: module.to_string(),
            outcome: Outcome::InfraError,
            duration: 0.0,
            message: Some(why.clone()),
            attempts: Vec::new(),
        }],
        duration: 0.0,
        note: Some(why),
        output: None,
        output_truncated: false,
    }
}

impl Drop for DockerRunner {
    fn drop(&mut self) {
        let Some(rt) = self.rt.take() else { return };
        for p in self.lock_projects().values() {
            let _ = std::fs::remove_dir_all(&p.holder);
        }
        let this = &*self;
        // On a plain thread: the runner may be dropped inside another runtime.
        std::thread::scope(|s| {
            let cleanup = s.spawn(|| rt.block_on(this.remove_everything()));
            if let Ok(Err(e)) = cleanup.join() {
                tracing::warn!(error = %e, "could not remove this node's containers");
            }
        });
        rt.shutdown_background();
    }
}

impl Runner for DockerRunner {
    fn name(&self) -> &str {
        "docker"
    }

    fn prepare(&self, source: &ProjectSource) -> Result<PreparedProject, RunnerError> {
        if let Some(old) = self.lock_projects().get(&source.id).cloned() {
            self.release(&old.prepared);
        }
        let projects = self.settings.cache_dir.join("projects");
        std::fs::create_dir_all(&projects)?;
        let holder = tempfile::Builder::new().prefix("p-").tempdir_in(&projects)?.keep();
        let copy = holder.join("root");
        let content_hash = crate::local::content_hash(&source.root)?;
        env::copy_tree(&source.root, &copy)?;
        std::fs::set_permissions(&holder, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let plan = match env::plan(&copy, &source.extra_requirements) {
            Ok(plan) => plan,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&holder);
                return Err(e);
            }
        };
        let env = if plan.is_empty() {
            None
        } else {
            match self.block_on(self.make_env(&plan, &source.id, &copy, &content_hash)) {
                Ok(dir) => Some(dir),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&holder);
                    return Err(e);
                }
            }
        };
        let prepared = PreparedProject {
            id: source.id.clone(),
            name: source.name.clone(),
            root: source.root.clone(),
            content_hash,
        };
        let project = Project { prepared: prepared.clone(), copy, holder, env, idle: Mutex::new(Vec::new()) };
        self.lock_projects().insert(source.id.clone(), Arc::new(project));
        Ok(prepared)
    }

    fn discover(&self, project: &PreparedProject) -> Result<Vec<String>, RunnerError> {
        let state = self.project(&project.id)?;
        self.block_on(self.discover_in(&state))
    }

    fn run(
        &self,
        project: &PreparedProject,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<TaskReport, RunnerError> {
        let state = self.project(&project.id)?;
        Ok(self.block_on(self.run_task(&state, task, limits)))
    }

    fn release(&self, project: &PreparedProject) {
        let state = self.lock_projects().remove(&project.id);
        let docker = &self.docker;
        let node = &self.settings.node_id;
        self.block_on(async {
            if let Some(state) = &state {
                let idle: Vec<Sandbox> =
                    state.idle.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
                for s in idle {
                    sandbox::remove(docker, &s.id).await;
                }
            }
            // Containers of this project still out (a task running while released) go too.
            match sandbox::labelled(docker, LABEL_PROJECT, &project.id).await {
                Ok(found) => {
                    for (id, labels) in found {
                        let ours = labels.get(LABEL_NODE) == Some(node)
                            && labels.get(LABEL_OWNER).map(String::as_str) == Some(sandbox::owner_id());
                        if ours {
                            sandbox::remove(docker, &id).await;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not list the project's containers"),
            }
            if let Some(state) = &state {
                self.forget(&state.copy).await;
            }
        });
        if let Some(state) = state {
            let _ = std::fs::remove_dir_all(&state.holder);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_relabels_unfinished_tests_only() {
        let mut reports = vec![ModuleReport {
            module: "t.py".into(),
            tests: vec![
                TestResult {
                    nodeid: "t.py::a".into(),
                    outcome: Outcome::Passed,
                    duration: 0.0,
                    message: None,
                    attempts: Vec::new(),
                },
                TestResult {
                    nodeid: "t.py::b".into(),
                    outcome: Outcome::Crashed,
                    duration: 0.0,
                    message: None,
                    attempts: Vec::new(),
                },
            ],
            duration: 0.0,
            note: Some("crashed".into()),
            output: None,
            output_truncated: false,
        }];
        mark_oom(&mut reports, 64);
        assert_eq!(reports[0].tests[0].outcome, Outcome::Passed);
        assert_eq!(reports[0].tests[1].outcome, Outcome::Oom);
        assert!(reports[0].note.as_deref().unwrap_or("").contains("64 MiB"));
    }

    #[test]
    fn infra_failures_are_reported_per_module() {
        let err = DockerError::Image("gone".into());
        let r = infra_report("tests/test_a.py", &err);
        assert_eq!(r.counts().infra_error, 1);
        assert!(r.tests[0].message.as_deref().unwrap_or("").contains("gone"));
    }

    #[test]
    fn engine_errors_become_infra_errors() {
        let e: RunnerError = DockerError::Command { what: "x".into(), detail: "y".into() }.into();
        assert!(matches!(e, RunnerError::Infra(_)));
    }

    #[test]
    fn container_env_puts_plugin_and_env_on_the_path() {
        let env = base_env(Some("/opt/cdtester:/env"));
        assert!(env.contains(&"PYTHONPATH=/opt/cdtester:/env".to_string()));
        assert!(env.contains(&"HOME=/tmp".to_string()));
        assert!(!base_env(None).iter().any(|e| e.starts_with("PYTHONPATH=")));
    }
}
