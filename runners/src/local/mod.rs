//! The `local` runner: pytest in a subprocess of this machine, for trusted code (it confines tests
//! without being a sandbox against a hostile one; see [`sandbox`]).
//!
//! - Environments: a cached base virtualenv with pytest, plus a per-project environment for
//!   projects that must be installed or need extra requirements (see [`env`]).
//! - Discovery: `python -m pytest --collect-only` with the reporting plugin, so modules are exactly
//!   what pytest collects under the project's own configuration.
//! - Runs: every module runs alone (`python -m pytest -p no:cacheprovider <module>`), by default
//!   in a child forked from a warm worker that has already imported pytest (see [`warm`]); with
//!   `warm = false`, or if the worker fails, in a fresh interpreter. Each run has its own session
//!   and process group, killed when the wall-clock limit runs out.
//! - Confinement (collection and runs alike, see [`sandbox`]): a cleared environment, rlimits
//!   (CPU, file size, open files, processes), and an unprivileged uid when the node is root.
//! - Limits enforced: `timeout_s` and `output_kib`, plus the rlimits. Memory and a per-run pid
//!   limit need a sandbox (use the `docker` runner).

mod env;
mod process;
mod sandbox;
mod together;
pub(crate) mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdtester_runner_api::{
    Chunk, Limits, ModuleReport, PreparedProject, ProjectSource, Rlimits, Runner, RunnerError, TaskReport,
    TaskSpec, round2,
};

pub(crate) use env::tail;
pub use env::{Interpreter, PYTEST_REQUIREMENT, content_hash, needs_install, resolve_python};
pub use sandbox::DEFAULT_UNPRIVILEGED_ID;

use crate::pytest::{self, Mode};
use crate::wheelhouse::PackageSource;
use process::{Exec, Invocation};
use sandbox::{Confinement, Sandbox, TaskDir};
use together::AloneMemory;
use warm::{WarmServer, ZygoteSpec, Zygotes};

/// Wall-clock limit of a discovery (collect-only) run.
pub const DISCOVER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("environment: {0}")]
    Env(String),
    #[error("extra {0}")]
    Requirement(#[from] cdtester_runner_api::requirement::RequirementError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How the local runner is set up (from `runner.local` in the configuration).
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Interpreter to build environments from; `None` = `python3` on PATH, resolved once.
    pub python: Option<PathBuf>,
    /// Where environments and the runner's support files are cached.
    pub venv_dir: PathBuf,
    /// Fork modules from a warm worker (default) instead of starting a fresh interpreter each.
    pub warm: bool,
    /// Uid/gid tests run as when this process is root (default [`DEFAULT_UNPRIVILEGED_ID`]).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Resource limits of every test process.
    pub rlimits: Rlimits,
    /// Wheels environments are built from instead of the index (`runner.wheelhouse`).
    pub wheelhouse: Option<PathBuf>,
}

struct ProjectState {
    python: PathBuf,
    /// Where its tests run: `prepared.root`, or a copy owned by the tests' uid.
    run_root: PathBuf,
    _copy: Option<tempfile::TempDir>,
    /// Whether its environment has the project installed (then it is the project's alone).
    own_env: bool,
    /// Module reports from a shared session (see [`together`]), each handed out once.
    shared: Mutex<HashMap<String, ModuleReport>>,
}

pub struct LocalRunner {
    opts: LocalOptions,
    envs: env::EnvManager,
    support: PathBuf,
    sandbox: Sandbox,
    projects: Mutex<HashMap<String, Arc<ProjectState>>>,
    zygotes: Zygotes,
    alone: AloneMemory,
}

impl LocalRunner {
    pub fn new(opts: LocalOptions) -> Result<LocalRunner, LocalError> {
        let interpreter = Interpreter::probe(opts.python.as_deref())?;
        let python = interpreter.executable.clone();
        std::fs::create_dir_all(&opts.venv_dir)?;
        let venv_dir = std::fs::canonicalize(&opts.venv_dir)?;
        let source = PackageSource::new(opts.wheelhouse.as_deref())
            .map_err(|e| LocalError::Env(format!("runner.wheelhouse: {e}")))?;
        // Tests must reach the interpreter and the environments as their own uid.
        let mut sandbox = Sandbox::new(opts.uid, opts.gid, opts.rlimits.clone())?;
        let mut needed = interpreter.dirs.clone();
        needed.push(venv_dir.clone());
        sandbox.expose(&needed)?;
        // Support files (reporting plugin + fork server), keyed by their content.
        let mut key = content_key(pytest::PLUGIN_SOURCE);
        key.push_str(&content_key(warm::SERVER_SOURCE));
        let support = pytest::install_plugin(&venv_dir.join(format!("support-{key}")))?;
        let server = support.join(warm::SERVER_FILE);
        if std::fs::read_to_string(&server).ok().as_deref() != Some(warm::SERVER_SOURCE) {
            let tmp = support.join(format!(".server.{}.tmp", std::process::id()));
            std::fs::write(&tmp, warm::SERVER_SOURCE)?;
            std::fs::rename(&tmp, &server)?;
        }
        let runner = LocalRunner {
            alone: AloneMemory::open(&venv_dir),
            envs: env::EnvManager::new(&interpreter, venv_dir.clone(), source),
            opts: LocalOptions { venv_dir, ..opts },
            support,
            sandbox,
            projects: Mutex::new(HashMap::new()),
            zygotes: Zygotes::default(),
        };
        // The base environment's zygote starts now (when that environment is built), so that
        // its interpreter and pytest import while the caller is still getting ready (and while
        // the check below runs): most projects run there.
        if let Some(base) = runner.envs.base_if_built() {
            runner.zygote(&env::venv_python(&base), false);
        }
        let (work, venv) = (runner.sandbox.work(), runner.opts.venv_dir.as_path());
        env::check_usable(&python, &runner.sandbox.confinement(DISCOVER_TIMEOUT), &[venv, work])?;
        Ok(runner)
    }

    /// The interpreter a prepared project's tests run with (its environment's `python`).
    pub fn interpreter(&self, project: &PreparedProject) -> Option<PathBuf> {
        self.projects.lock().unwrap_or_else(|e| e.into_inner()).get(&project.id).map(|s| s.python.clone())
    }

    fn state(&self, project: &PreparedProject) -> Result<Arc<ProjectState>, RunnerError> {
        self.projects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&project.id)
            .cloned()
            .ok_or_else(|| RunnerError::UnknownProject(project.id.clone()))
    }

    /// The warm worker of the project's environment (shared with every project using it),
    /// started on first use; `None` when disabled or it cannot start.
    fn warm_server(&self, state: &ProjectState) -> Option<Arc<WarmServer>> {
        self.zygote(&state.python, state.own_env)
    }

    /// The zygote of the environment of `python` (`own_env`: it has a project installed, so the
    /// zygote imports none of its plugins), started on first use; `None` when disabled or it
    /// cannot start.
    fn zygote(&self, python: &Path, own_env: bool) -> Option<Arc<WarmServer>> {
        if !self.opts.warm {
            return None;
        }
        self.zygotes.get(python, || ZygoteSpec {
            server_dir: self.support.clone(),
            cwd: self.sandbox.work().to_path_buf(),
            env: sandbox::test_env(python, &self.support),
            confine: self.sandbox.server_confinement(),
            plugins: !own_env,
        })
    }

    /// Runs one pytest invocation of `state`'s project, warm if possible.
    fn exec(&self, state: &ProjectState, spec: &ExecSpec) -> std::io::Result<Exec> {
        let (timeout, output_kib, task) = (spec.timeout, spec.output_kib, spec.task);
        let confine: Confinement = self.sandbox.confinement(timeout);
        let inv = Invocation {
            python: &state.python,
            args: spec.args,
            env: spec.env,
            cwd: &state.run_root,
            confine: &confine,
        };
        if let Some(server) = self.warm_server(state) {
            match server.run(&inv, task.path(), timeout, output_kib) {
                Ok(w) => {
                    return Ok(Exec { end: w.end, output: w.output, truncated: w.truncated, wall: w.wall });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "warm run failed; running in a fresh interpreter");
                    self.zygotes.discard(&state.python, &server);
                    // The fresh retry starts from an empty record file (the test's uid owns it).
                    std::fs::OpenOptions::new().write(true).truncate(true).open(task.records())?;
                }
            }
        }
        process::run(&inv, timeout, output_kib)
    }

    /// Runs `modules` (relative paths, or empty for pytest's own selection) in one pytest process
    /// and returns the plugin's record text and how the process went.
    fn invoke(
        &self,
        state: &ProjectState,
        mode: Mode,
        modules: &[String],
        chunk: Option<Chunk>,
        timeout: Duration,
        output_kib: u64,
    ) -> Result<(String, Exec), RunnerError> {
        let task = self.sandbox.task_dir()?;
        let mut env = sandbox::test_env(&state.python, &self.support);
        env.extend(task.env());
        env.extend(pytest::plugin_env(&task.records().to_string_lossy(), chunk));
        let args = pytest::pytest_args(mode, modules);
        let spec = ExecSpec { args: &args, env: &env, task: &task, timeout, output_kib };
        let exec = self.exec(state, &spec)?;
        let records = task.read_records().unwrap_or_default();
        Ok((records, exec))
    }

    fn run_module(
        &self,
        state: &ProjectState,
        module: &str,
        chunk: Option<Chunk>,
        limits: &Limits,
    ) -> Result<Vec<ModuleReport>, RunnerError> {
        let modules = [module.to_string()];
        let timeout = Duration::from_secs(limits.timeout_s.max(1));
        let (text, exec) = self.invoke(state, Mode::Run, &modules, chunk, timeout, limits.output_kib)?;
        let mut reports = pytest::build_reports(&modules, &pytest::parse_records(&text), &exec.end, chunk);
        if let Some(first) = reports.first_mut() {
            first.duration = round2(exec.wall);
            first.output_truncated = exec.truncated;
            let c = first.counts();
            // Output is kept where it helps: modules that did not come out clean.
            if c.failures() > 0 || first.note.is_some() || first.tests.is_empty() {
                first.output = Some(exec.output);
            }
        }
        Ok(reports)
    }
}

impl LocalRunner {
    /// Runs the modules of `known` in one session (see [`together`]): the whole project when
    /// `args` is empty (discovery), else the modules named. `Some(modules)`, with every module's
    /// report kept for [`Runner::run`], when the session collected exactly the modules of `known`
    /// and each counted exactly what it counted alone.
    fn run_shared(
        &self,
        state: &ProjectState,
        known: &std::collections::BTreeMap<String, cdtester_runner_api::Counts>,
        args: &[String],
        (timeout, output_kib): (Duration, u64),
    ) -> Result<Together, RunnerError> {
        let modules: Vec<String> = known.keys().cloned().collect();
        let (text, exec) = self.invoke(state, Mode::Run, args, None, timeout, output_kib)?;
        if let pytest::RunEnd::TimedOut(_) = exec.end {
            return Ok(Together::Unfinished);
        }
        if !matches!(exec.end, pytest::RunEnd::Exited(0 | 1))
            || pytest::parse_discovery(&text).modules != modules
        {
            return Ok(Together::Differs);
        }
        let mut reports = pytest::build_reports(&modules, &pytest::parse_records(&text), &exec.end, None);
        if reports.len() != modules.len() || reports.iter().any(|r| known.get(&r.module) != Some(&r.counts()))
        {
            return Ok(Together::Differs);
        }
        for r in &mut reports {
            r.duration = round2(r.tests.iter().map(|t| t.duration).sum());
            r.output_truncated = exec.truncated;
            let c = r.counts();
            if c.failures() > 0 || r.note.is_some() {
                r.output = Some(exec.output.clone());
            }
        }
        let mut shared = state.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.extend(reports.into_iter().map(|r| (r.module.clone(), r)));
        Ok(Together::Served(modules))
    }
}

/// How a shared session went (see [`together`]).
enum Together {
    /// Every module counted what it counted alone: these modules' reports wait to be served.
    Served(Vec<String>),
    /// It counted or collected differently (or pytest ended abnormally): these modules (the
    /// whole project at discovery, a group's modules in a task) never share it again.
    Differs,
    /// It ran out of time: no evidence either way; the modules run alone.
    Unfinished,
}

/// One pytest invocation: arguments, its whole environment, its run directory (with the plugin's
/// record file, emptied before a fresh retry of a failed warm run) and the limits.
struct ExecSpec<'a> {
    args: &'a [String],
    env: &'a [(String, String)],
    task: &'a TaskDir,
    timeout: Duration,
    output_kib: u64,
}

fn content_key(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(text.as_bytes())[..4])
}

impl LocalRunner {
    /// Runs the modules of one task in one session when each ran alone before (leaving out
    /// those that once counted differently in a group); their reports then wait in the
    /// project's shared reports. Otherwise (or when the session counts differently, which is
    /// remembered of its modules, or cannot run) nothing happens here and each module runs
    /// alone.
    fn share(&self, state: &ProjectState, project: &PreparedProject, modules: &[String], limits: &Limits) {
        // Modules whose reports discovery's shared session already holds need no session.
        let waiting: Vec<String> = {
            let served = state.shared.lock().unwrap_or_else(|e| e.into_inner());
            modules.iter().filter(|m| !served.contains_key(*m)).cloned().collect()
        };
        let Some(known) = self.alone.counts_of(&project.content_hash, &waiting) else { return };
        let args: Vec<String> = known.keys().cloned().collect();
        // One module's time limit for all of them: a group slower than that runs alone, each
        // module with its own limit.
        let timeout = Duration::from_secs(limits.timeout_s.max(1));
        match self.run_shared(state, &known, &args, (timeout, limits.output_kib)) {
            Ok(Together::Served(_)) => {}
            Ok(Together::Differs) => self.alone.mark_loners(&project.content_hash, &args),
            Ok(Together::Unfinished) => {
                tracing::info!(project = %project.id, "a shared session ran out of time: its modules run alone")
            }
            Err(e) => tracing::warn!(project = %project.id, "a shared session could not run: {e}"),
        }
    }
}

impl Runner for LocalRunner {
    fn name(&self) -> &str {
        "local"
    }

    fn prepare(&self, source: &ProjectSource) -> Result<PreparedProject, RunnerError> {
        if !source.root.is_dir() {
            return Err(RunnerError::Prepare(format!("{} is not a directory", source.root.display())));
        }
        let root = std::fs::canonicalize(&source.root)?;
        let hash = content_hash(&root)?;
        let own_env = needs_install(&root);
        let install = own_env.then_some((root.as_path(), hash.as_str()));
        let env = self
            .envs
            .project(&source.extra_requirements, install)
            .map_err(|e| RunnerError::Prepare(e.to_string()))?;
        let copy = self.sandbox.project_copy(&root)?;
        let run_root = copy.as_ref().map_or_else(|| root.clone(), |c| c.path().to_path_buf());
        let prepared =
            PreparedProject { id: source.id.clone(), name: source.name.clone(), root, content_hash: hash };
        let state = ProjectState {
            python: env::venv_python(&env),
            run_root,
            _copy: copy,
            own_env,
            shared: Mutex::default(),
        };
        self.projects.lock().unwrap_or_else(|e| e.into_inner()).insert(source.id.clone(), Arc::new(state));
        Ok(prepared)
    }

    fn discover(&self, project: &PreparedProject) -> Result<Vec<String>, RunnerError> {
        let state = self.state(project)?;
        if let Some(known) = self.alone.shareable(&project.content_hash) {
            let timeout = Duration::from_secs_f64(3.0 * together::MAX_TOTAL_SECS);
            match self.run_shared(&state, &known, &[], (timeout, Limits::default().output_kib))? {
                Together::Served(modules) => return Ok(modules),
                Together::Differs => self.alone.mark_differs(&project.content_hash),
                Together::Unfinished => {}
            }
        }
        let (text, exec) = self.invoke(&state, Mode::Collect, &[], None, DISCOVER_TIMEOUT, 64)?;
        let found = pytest::parse_discovery(&text);
        if !found.modules.is_empty() {
            return Ok(found.modules);
        }
        if found.exit == Some(5) || matches!(exec.end, pytest::RunEnd::Exited(5)) {
            return Err(RunnerError::NoTests);
        }
        Err(RunnerError::Discover(format!(
            "pytest collection failed ({:?}): {}",
            exec.end,
            env::tail(&exec.output, 1500)
        )))
    }

    fn run(
        &self,
        project: &PreparedProject,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<TaskReport, RunnerError> {
        let state = self.state(project)?;
        if task.chunk.is_some() && task.modules.len() != 1 {
            return Err(RunnerError::Infra(format!(
                "task {}: a chunk must name exactly one module",
                task.task_id
            )));
        }
        if task.chunk.is_none() && task.modules.len() > 1 {
            self.share(&state, project, &task.modules, limits);
        }
        let mut modules = Vec::with_capacity(task.modules.len());
        for module in &task.modules {
            if task.chunk.is_none() {
                let shared = state.shared.lock().unwrap_or_else(|e| e.into_inner()).remove(module);
                if let Some(report) = shared {
                    modules.push(report);
                    continue;
                }
            }
            let reports = self.run_module(&state, module, task.chunk, limits)?;
            if let (None, [alone]) = (task.chunk, reports.as_slice()) {
                self.alone.record(&project.content_hash, module, alone.counts(), alone.duration);
            }
            modules.extend(reports);
        }
        Ok(TaskReport { modules })
    }

    fn release(&self, project: &PreparedProject) {
        // A zygote lives while a prepared project uses its environment: the last release stops
        // it, so an idle node keeps no interpreter (it starts again on the next use).
        let unused = {
            let mut projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
            projects
                .remove(&project.id)
                .filter(|gone| !projects.values().any(|other| other.python == gone.python))
                .map(|gone| gone.python.clone())
        };
        if let Some(python) = unused {
            self.zygotes.stop(&python);
        }
        if let Err(e) = self.alone.save() {
            tracing::warn!(error = %e, "cannot save the run-alone counts");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdtester_runner_api::{Counts, Outcome};
    use std::path::Path;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// A runner whose environments are cached across test runs (the base env takes a few seconds
    /// to build once).
    fn runner(warm: bool) -> LocalRunner {
        let venv_dir = std::env::var_os("CDT_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("cdtester-runner-test-venvs");
        LocalRunner::new(LocalOptions {
            python: None,
            venv_dir,
            warm,
            uid: None,
            gid: None,
            rlimits: Rlimits::default(),
            wheelhouse: None,
        })
        .expect("python3 is available")
    }

    fn project(root: &Path) -> ProjectSource {
        // Project config: only `*_check.py` files under `checks/` are tests.
        write(root, "pytest.ini", "[pytest]\ntestpaths = checks\npython_files = *_check.py\n");
        write(root, "test_ignored.py", "def test_not_collected():\n    pass\n");
        write(
            root,
            "checks/a_check.py",
            "import pytest\n\n@pytest.mark.parametrize('i', range(10))\ndef test_p(i):\n    assert i != 7\n",
        );
        write(root, "checks/sub/__init__.py", "");
        write(
            root,
            "checks/sub/b_check.py",
            "import pytest\n\n@pytest.mark.xfail\ndef test_x():\n    assert 0\n\ndef test_s():\n    pytest.skip('no')\n",
        );
        write(root, "checks/broken_check.py", "raise ImportError('boom')\n");
        ProjectSource {
            id: "p1".into(),
            name: "p1".into(),
            root: root.to_path_buf(),
            extra_requirements: vec![],
        }
    }

    fn counts(report: &TaskReport) -> Counts {
        let mut c = Counts::default();
        for m in &report.modules {
            c.merge(&m.counts());
        }
        c
    }

    #[test]
    fn discovers_like_pytest_and_chunks_add_up_to_the_whole_module() {
        let dir = tempfile::tempdir().unwrap();
        let r = runner(true);
        let prepared = r.prepare(&project(dir.path())).unwrap();
        let modules = r.discover(&prepared).unwrap();
        assert_eq!(modules, ["checks/a_check.py", "checks/broken_check.py", "checks/sub/b_check.py"]);
        let limits = Limits::default();
        let whole = r.run(&prepared, &TaskSpec::new("t", modules.clone()), &limits).unwrap();
        assert_eq!(whole.modules.len(), 3);
        let c = counts(&whole);
        assert_eq!((c.passed, c.failed, c.error, c.xfailed, c.skipped), (9, 1, 1, 1, 1));
        assert!(whole.modules[1].tests[0].message.as_deref().unwrap().contains("boom"));

        let mut union = Vec::new();
        for module in &modules {
            for index in 0..3 {
                let mut task = TaskSpec::new("c", vec![module.clone()]);
                task.chunk = Some(Chunk { index, count: 3 });
                union.extend(r.run(&prepared, &task, &limits).unwrap().modules);
            }
        }
        let mut chunked = Counts::default();
        for m in &union {
            chunked.merge(&m.counts());
        }
        assert_eq!(chunked, c, "chunks of every module add up to the whole run");
        let mut ids: Vec<&str> =
            union.iter().flat_map(|m| m.tests.iter().map(|t| t.nodeid.as_str())).collect();
        ids.sort();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "no test runs in two chunks");
        r.release(&prepared);
    }

    #[test]
    fn warm_and_fresh_interpreters_agree_and_cap_output() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "tests/test_noisy.py",
            "def test_noisy():\n    print('x' * 5000)\n    assert False\n",
        );
        let source = ProjectSource {
            id: "n".into(),
            name: "n".into(),
            root: dir.path().into(),
            extra_requirements: vec![],
        };
        let limits = Limits { output_kib: 2, ..Limits::default() };
        let mut results = Vec::new();
        for warm in [true, false] {
            let r = runner(warm);
            let prepared = r.prepare(&source).unwrap();
            let report =
                r.run(&prepared, &TaskSpec::new("t", vec!["tests/test_noisy.py".into()]), &limits).unwrap();
            let m = &report.modules[0];
            assert!(m.output_truncated, "warm={warm}");
            assert!(m.output.as_deref().unwrap().contains("more bytes dropped"), "warm={warm}");
            results.push(m.tests.iter().map(|t| (t.nodeid.clone(), t.outcome)).collect::<Vec<_>>());
        }
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], [("tests/test_noisy.py::test_noisy".to_string(), Outcome::Failed)]);
    }

    #[test]
    fn warm_reports_of_many_failures_print_what_a_fresh_run_prints() {
        let dir = tempfile::tempdir().unwrap();
        // Several failures in one file (the zygote keeps that file's parsed tree between them),
        // a multi-line statement, and a test that rewrites its own file before later ones fail.
        write(
            dir.path(),
            "tests/test_many.py",
            "import pathlib\n\ndef f(x):\n    return x + 1\n\n\
             def test_a():\n    assert f(1) == 3\n\n\
             def test_b():\n    assert (\n        f(2)\n        == 5\n    )\n\n\
             def test_c():\n    p = pathlib.Path(__file__)\n    \
             p.write_text('# one\\n# two\\n# three\\n' + p.read_text())\n    assert f(0) == 2\n\n\
             def test_d():\n    x = f(5)\n    assert x == 7\n",
        );
        let source = ProjectSource {
            id: "m".into(),
            name: "m".into(),
            root: dir.path().into(),
            extra_requirements: vec![],
        };
        let modules = vec!["tests/test_many.py".to_string()];
        // What changes between runs: the timing and the private copy's folder.
        let stable = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with("rootdir:"))
                .map(|l| l.split(" in ").next().unwrap_or(l).to_string())
                .collect()
        };
        let mut outputs = Vec::new();
        for warm in [true, false] {
            let r = runner(warm);
            let prepared = r.prepare(&source).unwrap();
            let mut printed = Vec::new();
            for m in &modules {
                let report =
                    r.run(&prepared, &TaskSpec::new("t", vec![m.clone()]), &Limits::default()).unwrap();
                printed.extend(stable(report.modules[0].output.as_deref().unwrap_or_default()));
            }
            outputs.push(printed);
            r.release(&prepared);
        }
        assert!(outputs[0].iter().filter(|l| l.starts_with("E ")).count() >= 4, "{:#?}", outputs[0]);
        assert_eq!(outputs[0], outputs[1]);
    }

    #[test]
    fn projects_of_one_environment_share_a_zygote_and_nothing_else() {
        let r = runner(true);
        let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut prepared = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            // Same module names, different values: a module, path entry, variable or folder
            // left over from the other project would make a test fail.
            write(dir.path(), "helper.py", &format!("VALUE = {i}\n"));
            write(dir.path(), "pytest.ini", &format!("[pytest]\nmarkers =\n    p{i}: project {i}\n"));
            // An option of this project's own: the other must not see it (every session starts
            // from the zygote's pristine configuration).
            // Project 0 also plants a fixture in one of pytest's own plugin modules (the zygote
            // scanned those for fixtures once): its session must find it, the other's must not.
            let plant = if i == 0 {
                "import _pytest.tmpdir\nimport pytest\n\n@pytest.fixture\ndef _planted():\n    \
                 return 'here'\n\n_pytest.tmpdir.planted = _planted\ndel _planted\n\n"
            } else {
                ""
            };
            write(
                dir.path(),
                "conftest.py",
                &format!(
                    "{plant}def pytest_addoption(parser):\n    parser.addoption('--only-{i}', default='mine')\n"
                ),
            );
            write(
                dir.path(),
                "tests/test_state.py",
                &format!(
                    "import os, sys\nimport helper\n\n\
                     LEFT = 'cdt_leak' in sys.modules or 'CDT_LEAK' in os.environ\n\n\
                     def test_own_module():\n    assert helper.VALUE == {i}\n\n\
                     def test_own_folder():\n    assert os.getcwd() in sys.path\n    \
                     assert os.path.isfile('helper.py') and os.path.isfile('pytest.ini')\n\n\
                     def test_nothing_left_by_earlier_runs():\n    assert not LEFT\n    \
                     os.environ['CDT_LEAK'] = '{i}'\n    sys.modules['cdt_leak'] = sys\n    \
                     os.chdir('/')\n\n\
                     def test_own_invocation_and_options(pytestconfig):\n    \
                     assert pytestconfig.invocation_params.dir == pytestconfig.rootpath\n    \
                     assert pytestconfig.invocation_params.args[-1] == 'tests/test_state.py'\n    \
                     assert pytestconfig.getoption('only_{i}') == 'mine'\n    \
                     assert pytestconfig.getoption('only_{other}', 'absent') == 'absent'\n\n\
                     def test_no_warning_at_start_up(pytestconfig):\n    \
                     reporter = pytestconfig.pluginmanager.get_plugin('terminalreporter')\n    \
                     assert not reporter.stats.get('warnings')\n\n\
                     def test_own_ini(pytestconfig):\n    \
                     mine = [m for m in pytestconfig.getini('markers') if m.startswith('p') and 'project' in m]\n    \
                     assert mine == ['p{i}: project {i}']\n\n\
                     def test_exact_environment():\n    assert 'PYTHONPATH' in os.environ and 'HOME' in os.environ\n\n\
                     def test_fixture_planted_in_a_plugin_only_here(request):\n    \
                     import pytest\n    if {i} == 0:\n        \
                     assert request.getfixturevalue('planted') == 'here'\n    else:\n        \
                     with pytest.raises(pytest.FixtureLookupError):\n            \
                     request.getfixturevalue('planted')\n",
                    other = 1 - i
                ),
            );
            let source = ProjectSource {
                id: format!("z{i}"),
                name: format!("z{i}"),
                root: dir.path().into(),
                extra_requirements: vec![],
            };
            prepared.push(r.prepare(&source).unwrap());
        }
        let task = TaskSpec::new("t", vec!["tests/test_state.py".into()]);
        for round in 0..2 {
            for p in &prepared {
                let report = r.run(p, &task, &Limits::default()).unwrap();
                let c = counts(&report);
                assert_eq!((c.passed, c.failures()), (8, 0), "{} round {round}: {:?}", p.id, report.modules);
            }
        }
        assert_eq!(r.zygotes.live.lock().unwrap().len(), 1, "one zygote for the shared environment");
        r.release(&prepared[0]);
        assert_eq!(r.zygotes.live.lock().unwrap().len(), 1, "an environment still in use keeps its zygote");
        r.release(&prepared[1]);
        assert!(r.zygotes.live.lock().unwrap().is_empty(), "the last release stops the zygote");
    }

    /// Prepares, discovers and runs every module of `root` (one task per module); the module
    /// reports and whether discovery served them from a shared session.
    fn evaluate(r: &LocalRunner, root: &Path) -> (Vec<ModuleReport>, bool) {
        let source =
            ProjectSource { id: "s".into(), name: "s".into(), root: root.into(), extra_requirements: vec![] };
        let prepared = r.prepare(&source).unwrap();
        let modules = r.discover(&prepared).unwrap();
        let shared = !r.state(&prepared).unwrap().shared.lock().unwrap().is_empty();
        let mut reports = Vec::new();
        for m in modules {
            reports
                .extend(r.run(&prepared, &TaskSpec::new("t", vec![m]), &Limits::default()).unwrap().modules);
        }
        r.release(&prepared);
        (reports, shared)
    }

    /// A project whose `test_b` passes alone but fails after `test_a` in one session.
    fn differing_project(nonce: &str) -> tempfile::TempDir {
        let differs = tempfile::tempdir().unwrap();
        write(differs.path(), "nonce.py", &format!("# {nonce}\n"));
        write(differs.path(), "state.py", "seen = []\n");
        write(differs.path(), "tests/test_a.py", "import state\n\ndef test_a():\n    state.seen.append(1)\n");
        write(
            differs.path(),
            "tests/test_b.py",
            "import state\n\ndef test_b():\n    assert state.seen == []\n",
        );
        differs
    }

    #[test]
    fn small_modules_share_a_session_only_when_it_counts_the_same() {
        let r = runner(true);
        let nonce = tempfile::tempdir().unwrap();
        let nonce = nonce.path().display();
        let same = tempfile::tempdir().unwrap();
        write(same.path(), "nonce.py", &format!("# {nonce}\n"));
        write(same.path(), "tests/test_a.py", "def test_a():\n    assert 1\n\ndef test_b():\n    assert 0\n");
        write(
            same.path(),
            "tests/test_b.py",
            "import pytest\n\n@pytest.mark.parametrize('i', range(3))\ndef test_p(i):\n    assert i\n",
        );
        let (alone, shared) = evaluate(&r, same.path());
        assert!(!shared, "unknown content runs alone first");
        let (together, shared) = evaluate(&r, same.path());
        assert!(shared, "known small modules share a session");
        let outcomes = |reports: &[ModuleReport]| -> Vec<(String, Outcome)> {
            reports.iter().flat_map(|m| m.tests.iter().map(|t| (t.nodeid.clone(), t.outcome))).collect()
        };
        assert_eq!(outcomes(&together), outcomes(&alone));
        assert!(
            together[0].output.as_deref().unwrap_or("").contains("test_b"),
            "failing modules keep output"
        );

        // Together, test_b sees what test_a left in a shared module: it must run alone.
        let differs = differing_project(&nonce.to_string());
        let (alone, _) = evaluate(&r, differs.path());
        for round in 0..2 {
            let (again, shared) = evaluate(&r, differs.path());
            assert!(!shared, "round {round}");
            assert_eq!(outcomes(&again), outcomes(&alone));
        }
        assert_eq!(outcomes(&alone)[1], ("tests/test_b.py::test_b".to_string(), Outcome::Passed));
    }

    /// Runs `modules` of `root` as one task (no discovery before it); the reports.
    fn run_together(r: &LocalRunner, root: &Path, modules: &[&str]) -> Vec<ModuleReport> {
        run_together_within(r, root, modules, &Limits::default())
    }

    /// [`run_together`] with these limits.
    fn run_together_within(
        r: &LocalRunner,
        root: &Path,
        modules: &[&str],
        limits: &Limits,
    ) -> Vec<ModuleReport> {
        let source =
            ProjectSource { id: "g".into(), name: "g".into(), root: root.into(), extra_requirements: vec![] };
        let prepared = r.prepare(&source).unwrap();
        let task = TaskSpec::new("t", modules.iter().map(|m| m.to_string()).collect());
        let reports = r.run(&prepared, &task, limits).unwrap().modules;
        r.release(&prepared);
        reports
    }

    #[test]
    fn a_task_of_several_modules_shares_a_session_only_when_each_ran_alone_and_counts_the_same() {
        let r = runner(true);
        let nonce = tempfile::tempdir().unwrap();
        let nonce = nonce.path().display();
        let modules = ["tests/test_a.py", "tests/test_b.py"];
        let outcomes = |reports: &[ModuleReport]| -> Vec<(String, Outcome)> {
            reports.iter().flat_map(|m| m.tests.iter().map(|t| (t.nodeid.clone(), t.outcome))).collect()
        };
        let same = tempfile::tempdir().unwrap();
        write(same.path(), "nonce.py", &format!("# {nonce}\n"));
        write(same.path(), "tests/test_a.py", "def test_a():\n    assert 0\n");
        write(same.path(), "tests/test_b.py", "def test_b():\n    print('b ran')\n");
        let first = run_together(&r, same.path(), &modules);
        assert!(!first[0].output.as_deref().unwrap_or("").contains("b ran"), "never seen: each runs alone");
        let again = run_together(&r, same.path(), &modules);
        assert_eq!(outcomes(&again), outcomes(&first));
        assert!(
            again[0].output.as_deref().unwrap_or("").contains("test_b"),
            "known modules ran in one session (the failing one's output shows the other)"
        );

        // Together, test_b sees what test_a left behind: the task's modules run alone, and
        // they never share a session again.
        let differs = differing_project(&nonce.to_string());
        let alone = run_together(&r, differs.path(), &modules);
        for round in 0..2 {
            assert_eq!(
                outcomes(&run_together(&r, differs.path(), &modules)),
                outcomes(&alone),
                "round {round}"
            );
        }
        assert_eq!(outcomes(&alone)[1], ("tests/test_b.py::test_b".to_string(), Outcome::Passed));
    }

    /// A hostile project flooding its output in a shared session gets the task's output cap,
    /// as each of its modules does alone.
    #[test]
    fn a_shared_session_keeps_the_tasks_output_cap() {
        let r = runner(true);
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "nonce.py", &format!("# {}\n", dir.path().display()));
        write(dir.path(), "tests/test_a.py", "def test_a():\n    print('x' * 200000)\n    assert 0\n");
        write(dir.path(), "tests/test_b.py", "def test_b():\n    print('y' * 200000)\n");
        let limits = Limits { output_kib: 4, ..Limits::default() };
        let modules = ["tests/test_a.py", "tests/test_b.py"];
        run_together_within(&r, dir.path(), &modules, &limits);
        let shared = run_together_within(&r, dir.path(), &modules, &limits);
        let output = shared[0].output.as_deref().unwrap_or("");
        assert!(output.contains("test_b"), "the modules shared a session: {:.200}", output);
        assert!(shared[0].output_truncated, "the flood was cut");
        assert!(output.len() <= 8 * 1024, "{} bytes kept under a 4 KiB cap", output.len());
    }

    #[test]
    fn a_folder_without_tests_is_no_tests() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "lib.py", "x = 1\n");
        let r = runner(true);
        let prepared = r
            .prepare(&ProjectSource {
                id: "e".into(),
                name: "e".into(),
                root: dir.path().into(),
                extra_requirements: vec![],
            })
            .unwrap();
        assert!(matches!(r.discover(&prepared), Err(RunnerError::NoTests)));
        let missing = ProjectSource {
            id: "m".into(),
            name: "m".into(),
            root: dir.path().join("nope"),
            extra_requirements: vec![],
        };
        assert!(matches!(r.prepare(&missing), Err(RunnerError::Prepare(_))));
    }
}
