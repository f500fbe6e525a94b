use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::TaskReport;

/// `setrlimit` limits of the local runner's test processes (`runner.local.rlimits`; each process
/// of a test has its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rlimits {
    /// CPU seconds per process; `None` = the run's wall-clock timeout plus a few seconds.
    pub cpu_s: Option<u64>,
    /// Largest file a test may write, in MiB.
    pub fsize_mib: u64,
    /// Open file descriptors per process.
    pub nofile: u64,
    /// Processes and threads of the tests' uid, all together (`RLIMIT_NPROC` counts per user).
    pub nproc: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits { cpu_s: None, fsize_mib: 1024, nofile: 1024, nproc: 512 }
    }
}

/// Resource limits for one task. Runners enforce what their isolation level allows and document
/// what they ignore (the local runner enforces the timeout and output cap only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock seconds for one module; unfinished tests get `timeout`.
    pub timeout_s: u64,
    /// Memory limit (MiB); memory+swap is set to the same value.
    pub memory_mb: u64,
    /// CPU quota in cores.
    pub cpus: f64,
    /// Maximum number of processes/threads.
    pub pids: u64,
    /// Captured output kept per module (KiB); the rest is dropped and marked truncated.
    pub output_kib: u64,
    /// Size of the writable tmpfs (MiB) where a sandbox has a read-only root.
    pub tmpfs_mb: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { timeout_s: 120, memory_mb: 1024, cpus: 1.0, pids: 256, output_kib: 256, tmpfs_mb: 256 }
    }
}

/// Where a project's files are, before preparation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectSource {
    /// Unique id of the project within the network.
    pub id: String,
    /// Human name (top-level folder or repository name).
    pub name: String,
    /// Directory holding the project's files (its root: where pytest runs).
    pub root: PathBuf,
    /// Extra pip requirements the configuration asks for (e.g. test-only dependencies).
    #[serde(default)]
    pub extra_requirements: Vec<String>,
}

/// A project a runner has prepared (installed, venv made...). Runners keep their own state keyed
/// by `id`; the node only passes this handle back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedProject {
    pub id: String,
    pub name: String,
    pub root: PathBuf,
    /// Content hash of the project's files (hex sha256), used to key caches.
    pub content_hash: String,
}

/// One unit of work: one or more modules of one project, each reported separately.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub task_id: String,
    pub modules: Vec<String>,
    /// Run only one slice of a single slow module's tests (the task then has exactly one
    /// module); the slices' reports are merged per module by whoever split it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<Chunk>,
}

impl TaskSpec {
    /// A task running `modules` whole.
    pub fn new(task_id: impl Into<String>, modules: Vec<String>) -> TaskSpec {
        TaskSpec { task_id: task_id.into(), modules, chunk: None }
    }
}

/// Slice `index` of `count` contiguous slices of a module's collected tests (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub index: u32,
    pub count: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("project has no test modules pytest would collect")]
    NoTests,
    #[error("preparing the project failed: {0}")]
    Prepare(String),
    #[error("discovering test modules failed: {0}")]
    Discover(String),
    #[error("the runner's infrastructure failed: {0}")]
    Infra(String),
    #[error("unknown project {0}: prepare it first")]
    UnknownProject(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The contract every runner implements. Calls block; the node runs them on blocking threads,
/// so several tasks may run at once on one runner (it must be `Sync`).
pub trait Runner: Send + Sync {
    /// The name configuration uses to select this runner (`local`, `docker`, a plugin's name).
    fn name(&self) -> &str;

    /// Makes the project runnable (copy, install, environment) and returns its handle.
    fn prepare(&self, source: &ProjectSource) -> Result<PreparedProject, RunnerError>;

    /// The project's test modules, as pytest would collect them, relative to its root, sorted.
    fn discover(&self, project: &PreparedProject) -> Result<Vec<String>, RunnerError>;

    /// Runs the task's modules under `limits`; a module that cannot run still gets a report
    /// (with per-test verdicts such as `timeout` or `crashed`, or an `error` entry).
    fn run(
        &self,
        project: &PreparedProject,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<TaskReport, RunnerError>;

    /// Frees what `prepare` made for the project (containers, temporary copies). Idempotent.
    fn release(&self, project: &PreparedProject);
}
