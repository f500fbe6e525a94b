//! Aggregation: the `GET /evaluation/{id}` report and the `GET /stats` document.

use std::collections::{BTreeMap, BTreeSet};

use cdtester_runner_api::{Counts, Outcome, TestResult, round2};
use serde::{Deserialize, Serialize};

use super::{EvalRecord, ProjectRecord, ProjectState};
use crate::ids::{EvalId, NodeAddr, ProjectId};
pub use crate::wire::ModuleStatus;

/// Where an evaluation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalStatus {
    Running,
    Finished,
}

impl EvalStatus {
    /// The name used in JSON, CSV and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EvalStatus::Running => "running",
            EvalStatus::Finished => "finished",
        }
    }
}

/// Where a project is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectStatus {
    Preparing,
    Running,
    Finished,
    Failed,
}

impl ProjectStatus {
    /// The name used in JSON, CSV and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectStatus::Preparing => "preparing",
            ProjectStatus::Running => "running",
            ProjectStatus::Finished => "finished",
            ProjectStatus::Failed => "failed",
        }
    }
}

/// How tables group a module's or project's test outcomes, the same for `cdtester run` and
/// `cdtester submit --wait`: errors are every verdict that is neither a pass, a plain failure nor
/// a skip (error, timeout, crashed, oom, infra-error), as in JUnit's `<error>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    pub passed: u64,
    pub failed: u64,
    pub errors: u64,
    pub skipped: u64,
    pub xfailed: u64,
    pub xpassed: u64,
    /// Failed, then passed on a retry (`runner.retries`).
    pub flaky: u64,
}

impl Columns {
    pub fn of(c: &Counts) -> Columns {
        Columns {
            passed: c.passed,
            failed: c.failed,
            errors: c.error + c.timeout + c.crashed + c.oom + c.infra_error,
            skipped: c.skipped,
            xfailed: c.xfailed,
            xpassed: c.xpassed,
            flaky: c.flaky,
        }
    }
}

/// `GET /evaluation/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub id: EvalId,
    pub status: EvalStatus,
    /// The node that schedules the evaluation now (UDP `ip:port`).
    pub node: NodeAddr,
    pub start_time: f64,
    pub end_time: Option<f64>,
    /// Seconds from submission to completion (or to now while running).
    pub time_elapsed: f64,
    /// The evaluation this one reruns modules of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<EvalId>,
    /// Reruns of this evaluation, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reruns: Vec<EvalId>,
    pub summary: Summary,
    /// By project name.
    pub projects: BTreeMap<String, ProjectReport>,
}

/// Totals of an evaluation or a project. `executed`/`executing`/`pending` count modules (tasks);
/// `tests` counts individual tests by outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub pass_percentage: f64,
    pub fail_percentage: f64,
    pub executed: u64,
    pub executing: u64,
    pub pending: u64,
    pub total_passed: u64,
    pub total_failed: u64,
    pub tests: Counts,
    /// Mean of the project grades (0..20) once every project is finished; `null` before or when
    /// no project could be graded.
    pub grade: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectReport {
    pub id: ProjectId,
    /// Node responsible for the project (UDP `ip:port`).
    pub node: NodeAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub status: ProjectStatus,
    /// The runner its responsible node chose (once discovered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pass_percentage: f64,
    pub fail_percentage: f64,
    /// 0..20 once the project is finished (default: passes / (passes + failures) * 20, or a
    /// grading policy's verdict); `null` before, or when no test passed or failed.
    pub grade: Option<f64>,
    pub executed: u64,
    pub executing: u64,
    pub pending: u64,
    pub total_passed: u64,
    pub total_failed: u64,
    pub tests: Counts,
    /// Node ids of the tests that failed and then passed on a retry (outcome `flaky`; their
    /// attempts are in the per-test results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flaky: Vec<String>,
    /// By module path (relative to the project root).
    pub modules: BTreeMap<String, ModuleView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleView {
    pub status: ModuleStatus,
    /// Node that ran (or runs) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub passed: u64,
    pub failed: u64,
    pub pass_percentage: f64,
    pub fail_percentage: f64,
    pub counts: Counts,
    /// Seconds the module took.
    pub time: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Per-test results (left out when the report is asked for without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<Vec<TestResult>>,
    /// What the module's runs printed, when it did not come out clean (with the tests only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

fn percentages(c: &Counts) -> (f64, f64) {
    let graded = c.passes() + c.failures();
    if graded == 0 {
        return (0.0, 0.0);
    }
    let pass = round2(c.passes() as f64 * 100.0 / graded as f64);
    (pass, round2(100.0 - pass))
}

/// Builds the report, with per-test results when `with_tests`. `grade` decides a finished
/// project's grade from its tests.
pub fn build_report(
    rec: &EvalRecord,
    now: f64,
    with_tests: bool,
    grade: &dyn Fn(&ProjectRecord, &[TestResult]) -> Option<f64>,
) -> EvalReport {
    let mut projects = BTreeMap::new();
    let mut total = Counts::default();
    let (mut executed, mut executing, mut pending) = (0, 0, 0);
    let mut grades = Vec::new();
    let mut all_settled = true;
    for p in &rec.projects {
        let view = project_report(rec, p, with_tests, grade);
        total.merge(&view.tests);
        executed += view.executed;
        executing += view.executing;
        pending += view.pending;
        match view.status {
            ProjectStatus::Finished => grades.extend(view.grade),
            ProjectStatus::Failed => {}
            ProjectStatus::Preparing | ProjectStatus::Running => all_settled = false,
        }
        // Names are unique per evaluation (see `unique_names`).
        projects.insert(p.name.clone(), view);
    }
    let (pass_percentage, fail_percentage) = percentages(&total);
    let grade =
        (all_settled && !grades.is_empty()).then(|| round2(grades.iter().sum::<f64>() / grades.len() as f64));
    EvalReport {
        id: rec.id,
        status: if rec.end_time.is_some() { EvalStatus::Finished } else { EvalStatus::Running },
        node: rec.responsible,
        start_time: rec.start_time,
        end_time: rec.end_time,
        time_elapsed: round3(rec.end_time.unwrap_or(now) - rec.start_time),
        rerun_of: rec.rerun_of,
        reruns: Vec::new(),
        summary: Summary {
            pass_percentage,
            fail_percentage,
            executed,
            executing,
            pending,
            total_passed: total.passes(),
            total_failed: total.failures(),
            tests: total,
            grade,
        },
        projects,
    }
}

fn round3(x: f64) -> f64 {
    (x.max(0.0) * 1000.0).round() / 1000.0
}

fn project_report(
    rec: &EvalRecord,
    p: &ProjectRecord,
    with_tests: bool,
    grade: &dyn Fn(&ProjectRecord, &[TestResult]) -> Option<f64>,
) -> ProjectReport {
    let mut modules = BTreeMap::new();
    let mut counts = Counts::default();
    let (mut executed, mut executing, mut pending) = (0, 0, 0);
    let mut all_tests = Vec::new();
    let mut flaky = Vec::new();
    let (status, error) = match &p.state {
        ProjectState::Preparing => (ProjectStatus::Preparing, None),
        ProjectState::Failed { error } => (ProjectStatus::Failed, Some(error.clone())),
        ProjectState::Ready { modules: names, .. } => {
            for m in names {
                let progress = rec.module_progress(p, m);
                let c = progress.counts();
                counts.merge(&c);
                let status = progress.status();
                let tests = progress.tests();
                flaky.extend(tests.iter().filter(|t| t.outcome == Outcome::Flaky).map(|t| t.nodeid.clone()));
                match status {
                    ModuleStatus::Finished => {
                        executed += 1;
                        all_tests.extend(tests.iter().cloned());
                    }
                    ModuleStatus::Running => executing += 1,
                    ModuleStatus::Pending => pending += 1,
                }
                let (pp, fp) = percentages(&c);
                let view = ModuleView {
                    status,
                    node: progress.nodes(),
                    passed: c.passes(),
                    failed: c.failures(),
                    pass_percentage: pp,
                    fail_percentage: fp,
                    counts: c,
                    time: round3(progress.duration()),
                    note: progress.note(),
                    tests: with_tests.then_some(tests),
                    output: if with_tests { progress.output() } else { None },
                };
                modules.insert(m.clone(), view);
            }
            (if executing + pending == 0 { ProjectStatus::Finished } else { ProjectStatus::Running }, None)
        }
    };
    let (pass_percentage, fail_percentage) = percentages(&counts);
    let grade = if status == ProjectStatus::Finished { grade(p, &all_tests) } else { None };
    let runner = match &p.state {
        ProjectState::Ready { runner, .. } => Some(runner.clone()),
        _ => None,
    };
    ProjectReport {
        id: p.id.clone(),
        node: rec.responsible,
        url: p.url.clone(),
        status,
        runner,
        error,
        pass_percentage,
        fail_percentage,
        grade,
        executed,
        executing,
        pending,
        total_passed: counts.passes(),
        total_failed: counts.failures(),
        tests: counts,
        flaky,
        modules,
    }
}

/// `GET /stats`, exactly: `{"all": {...}, "nodes": [...]}`.
#[derive(Debug, Serialize, PartialEq)]
pub struct Stats {
    pub all: StatsAll,
    pub nodes: Vec<NodeStatsRow>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct StatsAll {
    pub failed: u64,
    pub passed: u64,
    pub projects: u64,
    pub evaluations: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct NodeStatsRow {
    pub address: String,
    pub failed: u64,
    pub passed: u64,
    pub projects: u64,
    pub modules: u64,
    pub evaluations: Vec<EvalId>,
}

/// Computes `/stats` from every evaluation record this node holds (replicated and persisted, so
/// independent of which nodes are up) and the nodes connected now (`nodes`, own address first).
/// Per-node numbers count the results each node produced that were accepted (each module once).
pub fn stats<'a>(records: impl IntoIterator<Item = &'a EvalRecord>, nodes: &[String]) -> Stats {
    let mut all = StatsAll { failed: 0, passed: 0, projects: 0, evaluations: 0 };
    let mut rows: Vec<NodeStatsRow> = nodes
        .iter()
        .map(|a| NodeStatsRow {
            address: a.clone(),
            failed: 0,
            passed: 0,
            projects: 0,
            modules: 0,
            evaluations: vec![],
        })
        .collect();
    let mut projects: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut modules: BTreeSet<(usize, EvalId, String, String)> = BTreeSet::new();
    for rec in records {
        all.evaluations += 1;
        all.projects += rec.projects.len() as u64;
        for (t, r) in &rec.results {
            let c = r.report.counts();
            all.passed += c.passes();
            all.failed += c.failures();
            let node = r.node.to_string();
            if let Some(i) = rows.iter().position(|row| row.address == node) {
                let row = &mut rows[i];
                row.passed += c.passes();
                row.failed += c.failures();
                modules.insert((i, rec.id, t.project().to_string(), t.module().to_string()));
                if !row.evaluations.contains(&rec.id) {
                    row.evaluations.push(rec.id);
                }
                projects.entry(i).or_default().insert(t.project().to_string());
            }
        }
    }
    for (i, set) in projects {
        rows[i].projects = set.len() as u64;
    }
    for (i, ..) in modules {
        rows[i].modules += 1;
    }
    for row in &mut rows {
        row.evaluations.sort_unstable();
    }
    Stats { all, nodes: rows }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{module_report, ready, result};
    use super::*;
    use crate::ids::TaskId;

    fn default_grade(_: &ProjectRecord, tests: &[TestResult]) -> Option<f64> {
        let mut c = Counts::default();
        tests.iter().for_each(|t| c.add(t.outcome));
        c.grade()
    }

    #[test]
    fn report_aggregates_modules_projects_and_grades() {
        let mut rec = EvalRecord::new(
            EvalId::test(9),
            NodeAddr::test("127.0.0.1:7000"),
            10.0,
            vec![ready("9-0", "calc", &["t_add.py", "t_sub.py"]), ready("9-1", "strs", &["t_up.py"])],
        );
        rec.add_result(
            &TaskId::test("9-0::t_add.py"),
            result(
                "127.0.0.1:7001",
                "a",
                module_report("t_add.py", &[Outcome::Passed, Outcome::Passed, Outcome::Failed]),
            ),
            11.0,
        );
        rec.running.insert(TaskId::test("9-0::t_sub.py"), NodeAddr::test("127.0.0.1:7002"));
        let r = build_report(&rec, 12.5, false, &default_grade);
        assert_eq!(r.status, EvalStatus::Running);
        assert_eq!((r.summary.executed, r.summary.executing, r.summary.pending), (1, 1, 1));
        assert_eq!(r.time_elapsed, 2.5);
        assert_eq!(r.projects["calc"].grade, None);
        assert_eq!(r.summary.grade, None);
        rec.add_result(
            &TaskId::test("9-0::t_sub.py"),
            result("127.0.0.1:7002", "b", module_report("t_sub.py", &[Outcome::Passed])),
            13.0,
        );
        rec.add_result(
            &TaskId::test("9-1::t_up.py"),
            result(
                "127.0.0.1:7000",
                "c",
                module_report("t_up.py", &[Outcome::Passed, Outcome::Skipped, Outcome::Error]),
            ),
            14.0,
        );
        let r = build_report(&rec, 20.0, true, &default_grade);
        assert_eq!(r.status, EvalStatus::Finished);
        let json = serde_json::to_string(&r).unwrap();
        let back: EvalReport = serde_json::from_str(&json).expect("a report reads back");
        assert_eq!(back.projects["calc"].status, ProjectStatus::Finished);
        assert_eq!(back.projects["calc"].modules["t_add.py"].status, ModuleStatus::Finished);
        assert!(json.contains(r#""status":"finished""#), "{json}");
        assert_eq!(r.time_elapsed, 4.0);
        let calc = &r.projects["calc"];
        assert_eq!((calc.total_passed, calc.total_failed, calc.grade), (3, 1, Some(15.0)));
        assert_eq!(calc.pass_percentage, 75.0);
        let tests = calc.modules["t_add.py"].tests.as_ref().unwrap();
        assert_eq!(tests[2].message.as_deref(), Some("assert 1 == 2"));
        assert_eq!(r.projects["strs"].grade, Some(10.0));
        assert_eq!(r.summary.grade, Some(12.5));
        assert_eq!((r.summary.total_passed, r.summary.total_failed), (4, 2));
        assert_eq!(r.summary.tests.skipped, 1);
        assert!(r.projects["calc"].flaky.is_empty() && r.rerun_of.is_none());
    }

    #[test]
    fn flaky_tests_are_listed_and_counted_apart() {
        let mut rec = EvalRecord::new(
            EvalId::test(9),
            NodeAddr::test("127.0.0.1:7000"),
            10.0,
            vec![ready("9-0", "calc", &["t.py"])],
        );
        rec.rerun_of = Some(EvalId::test(3));
        let report = module_report("t.py", &[Outcome::Passed, Outcome::Flaky, Outcome::Failed]);
        rec.add_result(&TaskId::test("9-0::t.py"), result("127.0.0.1:7001", "a", report), 11.0);
        let r = build_report(&rec, 12.0, false, &default_grade);
        let calc = &r.projects["calc"];
        assert_eq!(calc.flaky, ["t.py::test_1"], "listed without the per-test results too");
        assert_eq!((calc.tests.flaky, calc.total_passed, calc.total_failed), (1, 1, 1));
        assert_eq!(calc.grade, Some(13.33), "the default counts a flaky test as a pass");
        assert_eq!(r.rerun_of, Some(EvalId::test(3)));
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["projects"]["calc"]["flaky"], serde_json::json!(["t.py::test_1"]));
    }

    #[test]
    fn stats_have_the_exact_shape_and_count_each_module_once() {
        let mut rec = EvalRecord::new(
            EvalId::test(12345),
            NodeAddr::test("127.0.0.1:7000"),
            1.0,
            vec![ready("p", "calc", &["a.py", "b.py"])],
        );
        rec.add_result(
            &TaskId::test("p::a.py"),
            result("127.0.0.1:7001", "a", module_report("a.py", &[Outcome::Passed, Outcome::Failed])),
            2.0,
        );
        rec.add_result(
            &TaskId::test("p::a.py"),
            result("127.0.0.1:7002", "b", module_report("a.py", &[Outcome::Passed])),
            2.0,
        );
        rec.add_result(
            &TaskId::test("p::b.py"),
            result("127.0.0.1:7001", "c", module_report("b.py", &[Outcome::Passed])),
            2.0,
        );
        let s = stats([&rec], &["127.0.0.1:7000".into(), "127.0.0.1:7001".into()]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(
            json,
            r#"{"all":{"failed":1,"passed":2,"projects":1,"evaluations":1},"nodes":[{"address":"127.0.0.1:7000","failed":0,"passed":0,"projects":0,"modules":0,"evaluations":[]},{"address":"127.0.0.1:7001","failed":1,"passed":2,"projects":1,"modules":2,"evaluations":[12345]}]}"#
        );
    }

    #[test]
    fn status_names_are_their_json_names() {
        let json = |v: serde_json::Value| v.as_str().map(str::to_string);
        for s in [EvalStatus::Running, EvalStatus::Finished] {
            assert_eq!(json(serde_json::json!(s)).as_deref(), Some(s.as_str()));
        }
        for s in
            [ProjectStatus::Preparing, ProjectStatus::Running, ProjectStatus::Finished, ProjectStatus::Failed]
        {
            assert_eq!(json(serde_json::json!(s)).as_deref(), Some(s.as_str()));
        }
        for s in [ModuleStatus::Pending, ModuleStatus::Running, ModuleStatus::Finished] {
            assert_eq!(json(serde_json::json!(s)).as_deref(), Some(s.as_str()));
        }
    }
}
