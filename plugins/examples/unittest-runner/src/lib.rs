//! Example native runner plugin: the `unittest` runner runs a project's Python `unittest` suites
//! (`python -m unittest` semantics, one module per process) and reports per-test results.
//!
//! - Discovery follows `unittest discover -p 'test*.py'` from the project root: files
//!   `test*.py` whose stem is an identifier, in the root or in package directories (with
//!   `__init__.py`) reachable from it.
//! - Per test: passed, failed, error, skipped, xfailed (`@expectedFailure`); an unexpected success
//!   is failed; a failing subtest fails its test; a failing `setUpClass`/`setUpModule` errors
//!   each test it kept from running; tear-down fixture errors get an entry of their own; a module
//!   that cannot be imported is one `error` entry.
//! - Limits: the wall-clock timeout (tests not finished get `timeout`, the process group is
//!   killed) and the output cap; nothing is installed (extra requirements are refused).
//! - Interpreter: `CDT_UNITTEST_PYTHON`, else the `python3` on PATH (resolved once).
//!
//! Built as a `cdylib`, loaded by cdtester through [`cdtester_runner_api::abi`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cdtester_runner_api::{
    Limits, ModuleReport, Outcome, PreparedProject, ProjectSource, Runner, RunnerError, TaskReport, TaskSpec,
    TestResult,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

cdtester_runner_api::export_runner!(UnittestRunner::new);

const DRIVER: &str = include_str!("driver.py");

pub struct UnittestRunner {
    python: OnceLock<Result<PathBuf, String>>,
}

impl Default for UnittestRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl UnittestRunner {
    pub fn new() -> UnittestRunner {
        UnittestRunner { python: OnceLock::new() }
    }

    fn python(&self) -> Result<&Path, RunnerError> {
        self.python
            .get_or_init(resolve_python)
            .as_deref()
            .map_err(|e| RunnerError::Infra(format!("no Python interpreter: {e}")))
    }

    fn run_module(
        &self,
        project: &PreparedProject,
        module: &str,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<ModuleReport, RunnerError> {
        let python = self.python()?;
        let scratch = std::env::temp_dir().join(format!("cdt-unittest-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&scratch)?;
        let report = run_in(python, &scratch, project, module, task, limits);
        let _ = std::fs::remove_dir_all(&scratch);
        report
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn resolve_python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CDT_UNITTEST_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        return Err(format!("python3 did not report its executable ({})", out.status));
    }
    Ok(PathBuf::from(path))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Event {
    Collected { collected: Vec<String> },
    Test(TestResult),
    Done { done: bool },
}

fn run_in(
    python: &Path,
    scratch: &Path,
    project: &PreparedProject,
    module: &str,
    task: &TaskSpec,
    limits: &Limits,
) -> Result<ModuleReport, RunnerError> {
    let results = scratch.join("results.jsonl");
    let output = scratch.join("output.txt");
    let out_file = std::fs::File::create(&output)?;
    let (chunk_index, chunk_count) = task.chunk.map(|c| (c.index, c.count)).unwrap_or((0, 1));
    let start = Instant::now();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(python)
            .arg("-c")
            .arg(DRIVER)
            .arg("run")
            .arg(module)
            .arg(&results)
            .arg(chunk_index.to_string())
            .arg(chunk_count.to_string())
            .current_dir(&project.root)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(out_file.try_clone()?)
            .stderr(out_file)
            .process_group(0)
            .spawn()
            .map_err(|e| RunnerError::Infra(format!("cannot start {}: {e}", python.display())))?
    };
    let deadline = Duration::from_secs(limits.timeout_s);
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (Some(status), false);
        }
        if start.elapsed() >= deadline {
            // SAFETY: kill(2) on the child's own process group (process_group(0) made it leader).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let duration = start.elapsed().as_secs_f64();

    let mut collected: Vec<String> = Vec::new();
    let mut tests: Vec<TestResult> = Vec::new();
    let mut done = false;
    let text = std::fs::read_to_string(&results).unwrap_or_default();
    for line in text.lines() {
        match serde_json::from_str::<Event>(line) {
            Ok(Event::Collected { collected: c }) => collected = c,
            Ok(Event::Test(t)) => tests.push(t),
            Ok(Event::Done { done: d }) => done = d,
            Err(_) => {} // a partial last line of a killed driver
        }
    }
    let (output, output_truncated) = read_capped(&output, limits.output_kib.saturating_mul(1024))?;
    let note = match (timed_out, done, status) {
        (true, _, _) => Some(format!("timed out after {} s", limits.timeout_s)),
        (false, false, Some(s)) => Some(format!("the interpreter died ({s}) before the module finished")),
        _ => None,
    };
    if !done {
        let missing = if timed_out { Outcome::Timeout } else { Outcome::Crashed };
        let seen: std::collections::HashSet<String> = tests.iter().map(|t| t.nodeid.clone()).collect();
        if collected.is_empty() {
            collected.push(module.to_string());
        }
        for id in collected.into_iter().filter(|id| !seen.contains(id)) {
            tests.push(TestResult::new(id, missing, 0.0, note.clone()));
        }
    }
    Ok(ModuleReport {
        module: module.to_string(),
        tests,
        duration,
        note,
        output: (!output.is_empty()).then_some(output),
        output_truncated,
    })
}

fn read_capped(path: &Path, cap: u64) -> std::io::Result<(String, bool)> {
    let file = std::fs::File::open(path)?;
    let total = file.metadata()?.len();
    let mut buf = Vec::new();
    file.take(cap).read_to_end(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), total > cap))
}

/// Files of `root`, relative, sorted (symlinks not followed).
fn walk(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let child = rel.join(entry.file_name());
            if ty.is_dir() {
                stack.push(child);
            } else if ty.is_file() {
                files.push(child);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

/// Test modules as `unittest discover -p 'test*.py'` finds them.
fn discover_modules(root: &Path) -> std::io::Result<Vec<String>> {
    let mut modules = Vec::new();
    for rel in walk(root)? {
        let Some(stem) = rel.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".py")) else {
            continue;
        };
        if !stem.starts_with("test") || !is_identifier(stem) {
            continue;
        }
        let in_packages = rel.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).all(|d| {
            d.file_name().and_then(|n| n.to_str()).is_some_and(is_identifier)
                && root.join(d).join("__init__.py").is_file()
        });
        if let (true, Some(s)) = (in_packages, rel.to_str()) {
            modules.push(s.to_string());
        }
    }
    Ok(modules)
}

impl Runner for UnittestRunner {
    fn name(&self) -> &str {
        "unittest"
    }

    fn prepare(&self, source: &ProjectSource) -> Result<PreparedProject, RunnerError> {
        if !source.extra_requirements.is_empty() {
            return Err(RunnerError::Prepare(format!(
                "the unittest runner installs nothing, but the configuration asks for {:?}",
                source.extra_requirements
            )));
        }
        let mut hash = Sha256::new();
        for rel in
            walk(&source.root).map_err(|e| RunnerError::Prepare(format!("{}: {e}", source.root.display())))?
        {
            hash.update(rel.to_string_lossy().as_bytes());
            hash.update([0]);
            hash.update(std::fs::read(source.root.join(&rel))?);
            hash.update([0]);
        }
        Ok(PreparedProject {
            id: source.id.clone(),
            name: source.name.clone(),
            root: source.root.clone(),
            content_hash: hex::encode(hash.finalize()),
        })
    }

    fn discover(&self, project: &PreparedProject) -> Result<Vec<String>, RunnerError> {
        let modules = discover_modules(&project.root).map_err(|e| RunnerError::Discover(e.to_string()))?;
        if modules.is_empty() {
            return Err(RunnerError::NoTests);
        }
        Ok(modules)
    }

    fn run(
        &self,
        project: &PreparedProject,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<TaskReport, RunnerError> {
        let modules = task
            .modules
            .iter()
            .map(|m| self.run_module(project, m, task, limits))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TaskReport { modules })
    }

    fn release(&self, _project: &PreparedProject) {}
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A small project exercising every verdict the runner reports.
    pub fn write_fixture(root: &Path) {
        let files: &[(&str, &str)] = &[
            ("calc.py", "def add(a, b):\n    return a + b\n"),
            (
                "test_calc.py",
                r#"import unittest
from calc import add

class TestAdd(unittest.TestCase):
    def test_ok(self):
        self.assertEqual(add(1, 2), 3)
    def test_wrong(self):
        self.assertEqual(add(1, 2), 4)
    def test_crash(self):
        raise KeyError("boom")
    @unittest.skip("not today")
    def test_skipped(self):
        pass
    @unittest.expectedFailure
    def test_xfail(self):
        self.assertEqual(1, 2)
    @unittest.expectedFailure
    def test_xpass(self):
        pass
    def test_sub(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertLess(i, 2)

class TestBrokenSetup(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("no db")
    def test_a(self):
        pass
"#,
            ),
            ("pkg/__init__.py", ""),
            ("pkg/test_import.py", "import does_not_exist\n"),
            ("nopkg/test_hidden.py", "raise SystemExit(1)\n"),
            (
                "test_slow.py",
                "import time, unittest\nclass T(unittest.TestCase):\n    def test_fast(self):\n        pass\n    def test_slow(self):\n        time.sleep(30)\n",
            ),
        ];
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }

    fn outcomes(report: &ModuleReport) -> BTreeMap<String, (Outcome, Option<String>)> {
        report.tests.iter().map(|t| (t.nodeid.clone(), (t.outcome, t.message.clone()))).collect()
    }

    /// The fixture project written under `root`, as a source to prepare.
    fn fixture_source(root: &Path) -> ProjectSource {
        write_fixture(root);
        ProjectSource { id: "1".into(), name: "calc".into(), root: root.into(), extra_requirements: vec![] }
    }

    #[test]
    fn reports_every_verdict_per_test() {
        let dir = tempfile::tempdir().unwrap();
        let src = fixture_source(dir.path());
        let r = UnittestRunner::new();
        let p = r.prepare(&src).unwrap();
        assert_eq!(p.content_hash.len(), 64);
        assert_eq!(r.discover(&p).unwrap(), vec!["pkg/test_import.py", "test_calc.py", "test_slow.py"]);

        let limits = Limits { timeout_s: 3, ..Limits::default() };
        let task = TaskSpec::new(
            "t",
            vec!["test_calc.py".into(), "pkg/test_import.py".into(), "test_slow.py".into()],
        );
        let report = r.run(&p, &task, &limits).unwrap();
        let calc = outcomes(&report.modules[0]);
        let o = |id: &str| calc.get(&format!("test_calc.py::{id}")).map(|x| x.0);
        assert_eq!(o("TestAdd::test_ok"), Some(Outcome::Passed));
        assert_eq!(o("TestAdd::test_wrong"), Some(Outcome::Failed));
        assert_eq!(o("TestAdd::test_crash"), Some(Outcome::Error));
        assert_eq!(o("TestAdd::test_skipped"), Some(Outcome::Skipped));
        assert_eq!(o("TestAdd::test_xfail"), Some(Outcome::Xfailed));
        assert_eq!(o("TestAdd::test_xpass"), Some(Outcome::Failed));
        assert_eq!(o("TestAdd::test_sub"), Some(Outcome::Failed));
        assert_eq!(o("TestBrokenSetup::test_a"), Some(Outcome::Error));
        assert_eq!(calc.len(), 8, "{calc:?}");
        let msg = |id: &str| calc[&format!("test_calc.py::{id}")].1.clone().unwrap_or_default();
        assert_eq!(msg("TestAdd::test_wrong"), "AssertionError: 3 != 4");
        assert_eq!(msg("TestAdd::test_crash"), "KeyError: 'boom'");
        assert_eq!(msg("TestAdd::test_skipped"), "not today");
        assert!(
            msg("TestAdd::test_sub").starts_with("(i=2): AssertionError"),
            "{}",
            msg("TestAdd::test_sub")
        );
        assert_eq!(msg("TestBrokenSetup::test_a"), "setUpClass: RuntimeError: no db");

        let import = &report.modules[1];
        assert_eq!(import.tests.len(), 1);
        assert_eq!(import.tests[0].outcome, Outcome::Error);
        assert!(import.tests[0].message.as_deref().unwrap().contains("does_not_exist"));

        let slow = outcomes(&report.modules[2]);
        assert_eq!(slow["test_slow.py::T::test_fast"].0, Outcome::Passed);
        assert_eq!(slow["test_slow.py::T::test_slow"].0, Outcome::Timeout);
        assert!(report.modules[2].duration < 10.0);
        assert_eq!(report.modules[2].note.as_deref(), Some("timed out after 3 s"));
    }

    #[test]
    fn chunks_split_a_module_and_requirements_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = fixture_source(dir.path());
        let r = UnittestRunner::new();
        let p = r.prepare(&src).unwrap();
        let mut ids = Vec::new();
        for index in 0..3 {
            let mut task = TaskSpec::new("t", vec!["test_calc.py".into()]);
            task.chunk = Some(cdtester_runner_api::Chunk { index, count: 3 });
            let report = r.run(&p, &task, &Limits::default()).unwrap();
            ids.extend(report.modules[0].tests.iter().map(|t| t.nodeid.clone()));
        }
        assert_eq!(ids.len(), 8);
        let src = ProjectSource { extra_requirements: vec!["six".into()], ..src };
        assert!(matches!(r.prepare(&src), Err(RunnerError::Prepare(_))));
    }
}
