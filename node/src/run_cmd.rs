//! `cdtester run <dir|zip>`: evaluate projects on this machine alone, no network.
//!
//! Exit status: 0 when every project was evaluated (whatever its tests did), 1 on usage or
//! infrastructure errors (missing path, bad zip, unusable runner), 2 when a project could not be
//! evaluated at all (no tests, its environment could not be built, collection failed).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, bail};
use cdtester_config::Config;
use cdtester_plugins::{PolicySet, ProjectMeta, RunnerChoice};
use cdtester_runner_api::{
    Counts, Limits, ModuleReport, Outcome, PreparedProject, ProjectSource, Runner, TaskReport, TaskSpec,
    TestResult, round2,
};
use cdtester_runners::local::{DurationStore, ModuleStat};
use serde::Serialize;

use crate::eval::Columns;
use crate::registry::{self, Registry};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A project folder, or a zip holding one project at its root or one per top-level folder.
    pub path: PathBuf,
    /// Print the results as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the results as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit_xml: Option<PathBuf>,
    /// Tasks run at the same time (default: runner.workers).
    #[arg(long)]
    pub workers: Option<usize>,
}

/// One project to evaluate.
#[derive(Debug, Clone)]
pub struct ProjectInput {
    pub name: String,
    pub root: PathBuf,
}

/// A project's results.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectResult {
    pub name: String,
    pub root: PathBuf,
    pub runner: String,
    /// 0..20, `None` when nothing gradable ran.
    pub grade: Option<f64>,
    pub counts: Counts,
    /// Wall-clock seconds from preparation to the last module.
    pub duration: f64,
    /// Why the project could not be evaluated, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub modules: Vec<ModuleResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleResult {
    pub counts: Counts,
    #[serde(flatten)]
    pub report: ModuleReport,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Mean of the projects' grades (projects without a grade are left out).
    pub grade: Option<f64>,
    pub counts: Counts,
    pub duration: f64,
    pub projects: Vec<ProjectResult>,
}

/// Entry point of `cdtester run`.
pub fn main(mut config: Config, args: RunArgs) -> anyhow::Result<()> {
    config.node.data_dir = data_dir(&config.node.data_dir, |k| std::env::var_os(k));
    let workers = args.workers.unwrap_or(config.runner.workers);
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let input = InputDir::open(&args.path)?;
    let projects: Vec<ProjectInput> = crate::archive::split_projects(input.path())
        .with_context(|| format!("reading {}", input.path().display()))?
        .into_iter()
        .map(|(name, root)| {
            // A zip holding one project at its root: name it after the zip, not the temporary folder.
            let name = match (&input, args.path.file_stem()) {
                (InputDir::Extracted(_), Some(stem)) if root == input.path() => {
                    stem.to_string_lossy().into_owned()
                }
                _ => name,
            };
            ProjectInput { name, root }
        })
        .collect();
    let registry = Registry::from_config(&config);
    // A runner or plugin that cannot be used is the operator's problem, not the project's: stop
    // before doing anything.
    for p in &projects {
        registry
            .get(&config.project_settings(&p.name, None).runner)
            .with_context(|| format!("project {}", p.name))?;
    }
    let policies = PolicySet::load(&config.plugins).context("loading policy plugins")?;
    let mut durations = DurationStore::open(&registry::durations_path(&config));
    let eval = evaluate(&registry, &policies, &config, &projects, workers, &mut durations);
    if let Err(e) = durations.save() {
        tracing::warn!(error = %e, "cannot save the duration memory");
    }
    if let Some(path) = &args.junit_xml {
        std::fs::write(path, junit_xml(&eval)).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&eval)?);
    } else {
        print!("{}", table(&eval));
    }
    if eval.projects.iter().any(|p| p.error.is_some()) {
        drop(input); // exit() skips destructors: remove the extracted zip first
        std::process::exit(2);
    }
    Ok(())
}

/// Where `cdtester run` keeps its data (duration memory, environments): the configured
/// `node.data_dir`, or, when it is the default (`cdtester-data`, relative to wherever the command
/// runs), `cdtester` in the user's cache folder (`$XDG_CACHE_HOME`, else `$HOME/.cache`).
fn data_dir(configured: &Path, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if configured != cdtester_config::NodeConfig::default().data_dir {
        return configured.to_path_buf();
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")));
    cache.map_or_else(|| configured.to_path_buf(), |c| c.join("cdtester"))
}

/// The folder to evaluate: the given one, or a zip extracted into a temporary folder.
enum InputDir {
    Dir(PathBuf),
    Extracted(tempfile::TempDir),
}

impl InputDir {
    fn open(path: &Path) -> anyhow::Result<InputDir> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: no such file or folder", path.display()))?;
        if meta.is_dir() {
            return Ok(InputDir::Dir(path.to_path_buf()));
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("cdtester-run-")
            .tempdir()
            .context("making a temporary folder")?;
        crate::archive::extract_zip(&bytes, dir.path())
            .with_context(|| format!("{} is not a usable zip", path.display()))?;
        Ok(InputDir::Extracted(dir))
    }

    fn path(&self) -> &Path {
        match self {
            InputDir::Dir(p) => p,
            InputDir::Extracted(d) => d.path(),
        }
    }
}

/// A project's preparation: ready to run, or (runner name, why not).
type PrepareOutcome = Result<Prepared, (String, String)>;

struct Prepared {
    runner: std::sync::Arc<dyn Runner>,
    runner_name: String,
    project: PreparedProject,
    limits: Limits,
    modules: Vec<String>,
    /// The project's policy chain (from its `[[projects]]` rule), consulted again for its grade.
    policies: Vec<String>,
}

/// Prepares, discovers and runs `projects` on `workers` parallel slots (tasks of all projects
/// share the pool, longest first), using and updating `durations`.
pub fn evaluate(
    registry: &Registry,
    policies: &PolicySet,
    config: &Config,
    projects: &[ProjectInput],
    workers: usize,
    durations: &mut DurationStore,
) -> Evaluation {
    let started = Instant::now();
    let workers = workers.max(1);
    let run_tag = format!("run{}-{}", std::process::id(), started.elapsed().as_nanos());

    // Phase 1: prepare and discover every project (in parallel).
    let prepared: Vec<Mutex<Option<PrepareOutcome>>> = projects.iter().map(|_| Mutex::new(None)).collect();
    let next = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..workers.min(projects.len()) {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(p) = projects.get(i) else { break };
                    let r = prepare_one(registry, policies, config, p, &format!("{run_tag}-{i}"));
                    *prepared[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    let prepared: Vec<PrepareOutcome> = prepared
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(("?".into(), "not prepared".into())))
        })
        .collect();

    // Phase 2: every task of every project, longest first, on the pool.
    let mut queue: Vec<(usize, TaskSpec, f64)> = Vec::new();
    for (i, p) in prepared.iter().enumerate() {
        if let Ok(p) = p {
            for (task, est) in durations.plan(&projects[i].name, &p.modules, workers) {
                queue.push((i, task, est));
            }
        }
    }
    queue.sort_by(|a, b| b.2.total_cmp(&a.2));
    let queue = Mutex::new(queue.into_iter().map(|(i, t, _)| (i, t)).collect::<VecDeque<_>>());
    let results: Mutex<Vec<(usize, TaskSpec, TaskReport)>> = Mutex::new(Vec::new());
    let finished_at: Vec<Mutex<f64>> = projects.iter().map(|_| Mutex::new(0.0)).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let Some((i, task)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                        break;
                    };
                    let Ok(p) = &prepared[i] else { continue };
                    let report = p.runner.run(&p.project, &task, &p.limits).unwrap_or_else(|e| TaskReport {
                        modules: task
                            .modules
                            .iter()
                            .map(|m| ModuleReport {
                                module: m.clone(),
                                tests: vec![TestResult {
                                    nodeid: m.clone(),
                                    outcome: Outcome::InfraError,
                                    duration: 0.0,
                                    message: Some(e.to_string()),
                                    attempts: Vec::new(),
                                }],
                                duration: 0.0,
                                note: Some(format!("runner error: {e}")),
                                output: None,
                                output_truncated: false,
                            })
                            .collect(),
                    });
                    let mut at = finished_at[i].lock().unwrap_or_else(|e| e.into_inner());
                    *at = at.max(started.elapsed().as_secs_f64());
                    drop(at);
                    results.lock().unwrap_or_else(|e| e.into_inner()).push((i, task, report));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    // Chunks of a module in chunk order.
    results.sort_by_key(|(i, t, _)| (*i, t.modules.first().cloned(), t.chunk.map(|c| c.index)));

    // Phase 3: merge per project and module.
    let mut out = Vec::with_capacity(projects.len());
    for (i, p) in prepared.into_iter().enumerate() {
        let input = &projects[i];
        let duration = round2(*finished_at[i].lock().unwrap_or_else(|e| e.into_inner()));
        match p {
            Err((runner, error)) => out.push(ProjectResult {
                name: input.name.clone(),
                root: input.root.clone(),
                runner,
                grade: None,
                counts: Counts::default(),
                duration,
                error: Some(error),
                modules: Vec::new(),
            }),
            Ok(p) => {
                let mut merged: BTreeMap<String, ModuleReport> = BTreeMap::new();
                for (_, _, report) in results.iter().filter(|(j, _, _)| *j == i) {
                    for m in &report.modules {
                        merge_module(&mut merged, m);
                    }
                }
                for m in merged.values() {
                    durations.record(
                        &input.name,
                        &m.module,
                        ModuleStat { secs: m.duration, tests: m.tests.len() as u64 },
                    );
                }
                p.runner.release(&p.project);
                let modules: Vec<ModuleResult> = merged
                    .into_values()
                    .map(|report| ModuleResult { counts: report.counts(), report })
                    .collect();
                let mut counts = Counts::default();
                for m in &modules {
                    counts.merge(&m.counts);
                }
                let tests: Vec<TestResult> = modules.iter().flat_map(|m| m.report.tests.clone()).collect();
                let grade = policies.grade(&p.policies, &input.name, &tests).value;
                out.push(ProjectResult {
                    name: input.name.clone(),
                    root: p.project.root.clone(),
                    runner: p.runner_name,
                    grade,
                    counts,
                    duration,
                    error: None,
                    modules,
                });
            }
        }
    }
    let mut counts = Counts::default();
    for p in &out {
        counts.merge(&p.counts);
    }
    let grades: Vec<f64> = out.iter().filter_map(|p| p.grade).collect();
    let grade = (!grades.is_empty()).then(|| round2(grades.iter().sum::<f64>() / grades.len() as f64));
    Evaluation { grade, counts, duration: round2(started.elapsed().as_secs_f64()), projects: out }
}

fn prepare_one(
    registry: &Registry,
    policies: &PolicySet,
    config: &Config,
    p: &ProjectInput,
    id: &str,
) -> PrepareOutcome {
    let settings = config.project_settings(&p.name, None);
    let configured = RunnerChoice { runner: settings.runner.clone(), limits: settings.limits.clone() };
    let fail = |e: String| (configured.runner.clone(), e);
    let meta = ProjectMeta::from_dir(&p.name, None, &p.root).map_err(|e| fail(e.to_string()))?;
    let choice = policies.decide(&settings.policies, &meta, configured.clone()).map_err(fail)?;
    let fail = |e: String| (choice.runner.clone(), e);
    let runner = registry.get(&choice.runner).map_err(|e| fail(e.to_string()))?;
    let source = ProjectSource {
        id: id.to_string(),
        name: p.name.clone(),
        root: p.root.clone(),
        extra_requirements: settings.requirements.clone(),
    };
    let project = runner.prepare(&source).map_err(|e| fail(e.to_string()))?;
    let modules = match runner.discover(&project) {
        Ok(m) => m,
        Err(e) => {
            runner.release(&project);
            return Err(fail(e.to_string()));
        }
    };
    Ok(Prepared {
        runner,
        runner_name: choice.runner,
        project,
        limits: choice.limits,
        modules,
        policies: settings.policies,
    })
}

/// Adds `m` (a whole module or one chunk of it) to `merged`.
fn merge_module(merged: &mut BTreeMap<String, ModuleReport>, m: &ModuleReport) {
    match merged.get_mut(&m.module) {
        None => {
            merged.insert(m.module.clone(), m.clone());
        }
        Some(into) => {
            into.tests.extend(m.tests.iter().cloned());
            into.duration = round2(into.duration + m.duration);
            into.output_truncated |= m.output_truncated;
            if let Some(note) = &m.note {
                into.note = Some(match into.note.take() {
                    Some(old) if &old != note => format!("{old}; {note}"),
                    _ => note.clone(),
                });
            }
            if let Some(out) = &m.output {
                into.output = Some(match into.output.take() {
                    Some(old) => format!("{old}\n{out}"),
                    None => out.clone(),
                });
            }
        }
    }
}

fn grade_text(g: Option<f64>) -> String {
    g.map_or_else(|| "-".to_string(), |g| format!("{g:.2}/20"))
}

/// The human-readable results table.
pub fn table(eval: &Evaluation) -> String {
    let mut s = String::new();
    for p in &eval.projects {
        let _ = writeln!(
            s,
            "project {} (runner {}): grade {}, {:.2} s",
            p.name,
            p.runner,
            grade_text(p.grade),
            p.duration
        );
        if let Some(e) = &p.error {
            let _ = writeln!(s, "  error: {e}\n");
            continue;
        }
        let width = p.modules.iter().map(|m| m.report.module.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(
            s,
            "  {:<width$} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
            "module", "passed", "failed", "skipped", "errors", "xfail", "other", "time"
        );
        let row = |s: &mut String, name: &str, c: &Counts, t: f64| {
            let c = Columns::of(c);
            let _ = writeln!(
                s,
                "  {:<width$} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7.2}s",
                name, c.passed, c.failed, c.skipped, c.errors, c.xfailed, c.xpassed, t
            );
        };
        for m in &p.modules {
            row(&mut s, &m.report.module, &m.counts, m.report.duration);
            if let Some(note) = &m.report.note {
                let _ = writeln!(s, "      note: {note}");
            }
        }
        row(&mut s, "total", &p.counts, p.duration);
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "{} project(s), {} tests: {} passed, {} failed, {} errors, {} skipped; overall grade {} in {:.2} s",
        eval.projects.len(),
        eval.counts.total(),
        eval.counts.passes(),
        eval.counts.failed,
        Columns::of(&eval.counts).errors,
        eval.counts.skipped,
        grade_text(eval.grade),
        eval.duration
    );
    s
}

/// XML-escapes `text` for attributes and text nodes, dropping characters XML 1.0 forbids.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                let _ = write!(out, "#x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// pytest's `classname`/`name` split of a node id: `a/b.py::C::t[1]` -> (`a.b.C`, `t[1]`).
fn junit_names(nodeid: &str) -> (String, String) {
    let mut parts: Vec<String> = nodeid.split("::").map(str::to_string).collect();
    if let Some(first) = parts.first_mut() {
        *first = first.trim_end_matches(".py").replace('/', ".");
    }
    let name = parts.pop().unwrap_or_default();
    (parts.join("."), name)
}

/// JUnit XML following pytest's `--junitxml` conventions: one `<testsuite>` per project, one
/// `<testcase>` per test, `<failure>` for failed and strict-xpass, `<error>` for errors (and
/// timeout / crashed / oom / infra-error verdicts), `<skipped>` for skips and xfails.
pub fn junit_xml(eval: &Evaluation) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<testsuites name=\"cdtester\">\n");
    for p in &eval.projects {
        let c = &p.counts;
        let errors = Columns::of(c).errors + u64::from(p.error.is_some());
        let _ = writeln!(
            s,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
            xml_escape(&p.name),
            c.total(),
            c.failed,
            errors,
            c.skipped + c.xfailed,
            p.duration
        );
        if let Some(e) = &p.error {
            let _ = writeln!(
                s,
                "    <testcase classname=\"\" name=\"{}\" time=\"0\"><error message=\"{}\"/></testcase>",
                xml_escape(&p.name),
                xml_escape(e)
            );
        }
        for m in &p.modules {
            for t in &m.report.tests {
                let (classname, name) = junit_names(&t.nodeid);
                let msg = xml_escape(t.message.as_deref().unwrap_or(""));
                let _ = write!(
                    s,
                    "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                    xml_escape(&classname),
                    xml_escape(&name),
                    t.duration
                );
                let child = match t.outcome {
                    Outcome::Passed | Outcome::Xpassed => None,
                    Outcome::Failed => Some(format!("<failure message=\"{msg}\">{msg}</failure>")),
                    Outcome::Skipped => {
                        Some(format!("<skipped type=\"pytest.skip\" message=\"{msg}\">{msg}</skipped>"))
                    }
                    Outcome::Xfailed => Some(format!("<skipped type=\"pytest.xfail\" message=\"{msg}\"/>")),
                    other => Some(format!("<error message=\"{other}: {msg}\">{msg}</error>")),
                };
                match child {
                    None => s.push_str("/>\n"),
                    Some(c) => {
                        let _ = writeln!(s, ">{c}</testcase>");
                    }
                }
            }
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(nodeid: &str, outcome: Outcome, msg: Option<&str>) -> TestResult {
        TestResult::new(nodeid, outcome, 0.1, msg.map(str::to_string))
    }

    fn module(name: &str, tests: Vec<TestResult>, duration: f64) -> ModuleReport {
        ModuleReport {
            module: name.into(),
            tests,
            duration,
            note: None,
            output: None,
            output_truncated: false,
        }
    }

    fn eval_of(modules: Vec<ModuleReport>) -> Evaluation {
        let modules: Vec<ModuleResult> =
            modules.into_iter().map(|r| ModuleResult { counts: r.counts(), report: r }).collect();
        let mut counts = Counts::default();
        for m in &modules {
            counts.merge(&m.counts);
        }
        Evaluation {
            grade: counts.grade(),
            counts,
            duration: 1.0,
            projects: vec![ProjectResult {
                name: "p<1>".into(),
                root: PathBuf::from("/p"),
                runner: "local".into(),
                grade: counts.grade(),
                counts,
                duration: 1.0,
                error: None,
                modules,
            }],
        }
    }

    #[test]
    fn chunks_merge_into_one_module() {
        let mut merged = BTreeMap::new();
        merge_module(&mut merged, &module("t.py", vec![result("t.py::a", Outcome::Passed, None)], 1.0));
        let mut second = module("t.py", vec![result("t.py::b", Outcome::Timeout, None)], 2.0);
        second.note = Some("timed out".into());
        merge_module(&mut merged, &second);
        let m = &merged["t.py"];
        assert_eq!(m.tests.len(), 2);
        assert_eq!(m.duration, 3.0);
        assert_eq!(m.note.as_deref(), Some("timed out"));
    }

    #[test]
    fn junit_follows_pytest_conventions() {
        let eval = eval_of(vec![module(
            "tests/test_a.py",
            vec![
                result("tests/test_a.py::TestX::test_ok", Outcome::Passed, None),
                result("tests/test_a.py::test_bad[<1>]", Outcome::Failed, Some("assert 1 == 2 & \"x\"")),
                result("tests/test_a.py::test_skip", Outcome::Skipped, Some("no db")),
                result("tests/test_a.py::test_xf", Outcome::Xfailed, Some("known")),
                result("tests/test_a.py::test_hang", Outcome::Timeout, Some("timed out")),
            ],
            1.0,
        )]);
        let xml = junit_xml(&eval);
        assert!(
            xml.contains(
                "<testsuite name=\"p&lt;1&gt;\" tests=\"5\" failures=\"1\" errors=\"1\" skipped=\"2\""
            ),
            "{xml}"
        );
        assert!(xml.contains("classname=\"tests.test_a.TestX\" name=\"test_ok\" time=\"0.100\"/>"), "{xml}");
        assert!(xml.contains("name=\"test_bad[&lt;1&gt;]\""), "{xml}");
        assert!(xml.contains("<failure message=\"assert 1 == 2 &amp; &quot;x&quot;\">"), "{xml}");
        assert!(xml.contains("<skipped type=\"pytest.xfail\" message=\"known\"/>"), "{xml}");
        assert!(xml.contains("<error message=\"timeout: timed out\">"), "{xml}");
        assert_eq!(xml.matches("<testcase").count(), 5);
    }

    #[test]
    fn table_shows_modules_totals_and_grade() {
        let eval = eval_of(vec![module(
            "tests/test_a.py",
            vec![
                result("tests/test_a.py::a", Outcome::Passed, None),
                result("tests/test_a.py::b", Outcome::Passed, None),
                result("tests/test_a.py::c", Outcome::Passed, None),
                result("tests/test_a.py::d", Outcome::Error, None),
            ],
            0.5,
        )]);
        let t = table(&eval);
        assert!(t.contains("grade 15.00/20"), "{t}");
        assert!(t.contains("tests/test_a.py"), "{t}");
        assert!(t.lines().any(|l| l.trim_start().starts_with("total") && l.contains(" 3 ")), "{t}");
    }

    #[test]
    fn run_data_goes_to_the_user_cache_unless_configured() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/u".into()),
            _ => None,
        };
        let default = cdtester_config::NodeConfig::default().data_dir;
        assert_eq!(data_dir(&default, env), PathBuf::from("/home/u/.cache/cdtester"));
        let xdg = |k: &str| (k == "XDG_CACHE_HOME").then(|| "/c".into());
        assert_eq!(data_dir(&default, xdg), PathBuf::from("/c/cdtester"));
        assert_eq!(data_dir(Path::new("/srv/d"), env), PathBuf::from("/srv/d"));
        assert_eq!(data_dir(&default, |_| None), default);
    }

    #[test]
    fn xml_escape_drops_control_characters() {
        assert_eq!(xml_escape("a\u{1b}[31mb"), "a#x1B[31mb");
    }
}
