//! The evaluation model: evaluations -> projects -> modules -> per-test results.
//!
//! An [`EvalRecord`] is the replicated, persisted state of one evaluation. Every node keeps a copy;
//! copies converge by [`EvalRecord::merge`], which is idempotent, commutative and only grows what
//! matters for counting (results are never removed), so:
//! - a result accepted once is never lost while any node holding the record survives;
//! - a module's result is stored once per task id: a duplicate (a re-run after a takeover, a late
//!   worker) is ignored, and when two different results meet, the same one wins on every node;
//! - `/stats` totals derived from the records never decrease.
//!
//! Responsibility for scheduling an evaluation's tasks (the "responsible node") is a field of the
//! record with a `term`: a takeover increments the term, and the higher term wins on merge.

mod report;

use std::collections::BTreeMap;

use cdtester_runner_api::{Chunk, Counts, Limits, ModuleReport, TestResult};
use serde::{Deserialize, Serialize};

use crate::ids::{EvalId, NodeAddr, ProjectId, TaskId, valid_module_path};

pub use report::{
    Columns, EvalReport, EvalStatus, ModuleStatus, ModuleView, NodeStatsRow, ProjectReport, ProjectStatus,
    Stats, StatsAll, Summary, build_report, stats,
};

/// Makes names unique: a name met before gets the first free `_<n>` suffix (n = 2, 3, ...).
pub fn unique_name(taken: &[String], name: &str) -> String {
    let mut unique = name.to_string();
    let mut n = 2;
    while taken.contains(&unique) {
        unique = format!("{name}_{n}");
        n += 1;
    }
    unique
}

/// Renames projects so that their names are unique within the evaluation ([`unique_name`]).
pub fn unique_names(projects: &mut [ProjectRecord]) {
    let mut taken: Vec<String> = Vec::with_capacity(projects.len());
    for p in projects {
        p.name = unique_name(&taken, &p.name);
        taken.push(p.name.clone());
    }
}

/// One task of an evaluation.
#[derive(Debug, Clone)]
pub struct TaskRef<'a> {
    pub task_id: TaskId,
    pub project: &'a ProjectRecord,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Timestamps closer than this (seconds) are the same instant: a copy read back from JSON may
/// differ in the last bit (serde_json's default float parsing is not exact), and merging that
/// must change nothing.
const SAME_INSTANT: f64 = 1e-6;

/// The replicated state of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub id: EvalId,
    /// UDP address of the node that accepted the submission.
    pub submitted_to: NodeAddr,
    /// UDP address of the node that schedules the evaluation's tasks now.
    pub responsible: NodeAddr,
    /// Responsibility term: increases with every takeover; the higher term wins.
    pub term: u64,
    /// Changes made by the responsible node within the current term (orders `running`).
    pub version: u64,
    pub start_time: f64,
    pub end_time: Option<f64>,
    pub projects: Vec<ProjectRecord>,
    /// Task ids handed to a worker and not finished yet, as last published by the responsible node.
    pub running: BTreeMap<TaskId, NodeAddr>,
    /// Results by task id.
    #[serde(default)]
    pub results: BTreeMap<TaskId, ModuleResult>,
    /// Task ids whose worker died while running them, and how often (see
    /// [`EvalRecord::worker_died`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub worker_deaths: BTreeMap<TaskId, u32>,
    /// The evaluation this one reruns modules of (`POST /evaluation/{id}/rerun`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<EvalId>,
}

/// Whether `name` can name a project: 1-255 bytes, not `.` or `..`, no `/`, `\\` or control
/// characters.
pub fn valid_project_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c.is_control() || c == '/' || c == '\\')
}

/// Whether `s` is a sha256 digest as cdtester writes it (64 lowercase hex digits).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The first characters of a peer-supplied string, for error messages.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Worker deaths after which a task is recorded as crashed and never handed out again.
pub const MAX_WORKER_DEATHS: u32 = 2;

/// One project of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectRecord {
    /// Unique in the network: `"<eval id>-<index>"` ([`ProjectId::of`]).
    pub id: ProjectId,
    /// Unique within the evaluation (a duplicate folder/repository name gets a `_<n>` suffix).
    pub name: String,
    /// Where it came from, credentials removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// sha256 of the project archive served by `GET /file/<id>`.
    pub content_hash: String,
    pub state: ProjectState,
}

/// Where a project is in its life cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ProjectState {
    /// Waiting for module discovery on the responsible node.
    Preparing,
    /// Modules known; tasks run with this runner and these limits. A module listed in `chunks`
    /// runs as that many tasks, each a contiguous slice of its tests.
    Ready {
        modules: Vec<String>,
        runner: String,
        limits: Limits,
        policies: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        chunks: BTreeMap<String, u32>,
    },
    /// The project cannot be evaluated (no tests, refused by a policy, discovery failed).
    Failed { error: String },
}

impl ProjectState {
    fn rank(&self) -> u8 {
        match self {
            ProjectState::Preparing => 0,
            ProjectState::Failed { .. } => 1,
            ProjectState::Ready { .. } => 2,
        }
    }
}

impl ProjectRecord {
    /// Task ids of one module (one, or one per chunk). A module that names no task (a record
    /// [`EvalRecord::validate`] refuses) has none.
    pub fn module_tasks(&self, module: &str) -> Vec<TaskId> {
        match &self.state {
            ProjectState::Ready { modules, .. } if !modules.iter().any(|m| m == module) => Vec::new(),
            ProjectState::Ready { chunks, .. } => match chunks.get(module) {
                Some(&count) if count > 1 => (0..count)
                    .filter_map(|index| TaskId::new(&self.id, module, Some(Chunk { index, count })).ok())
                    .collect(),
                _ => TaskId::new(&self.id, module, None).into_iter().collect(),
            },
            _ => Vec::new(),
        }
    }

    /// The modules of a ready project.
    pub fn modules(&self) -> &[String] {
        match &self.state {
            ProjectState::Ready { modules, .. } => modules,
            _ => &[],
        }
    }
}

/// A module's accepted result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleResult {
    /// UDP address of the node that ran it.
    pub node: NodeAddr,
    /// Unique per execution attempt.
    pub attempt: String,
    pub finished_at: f64,
    pub report: ModuleReport,
}

impl EvalRecord {
    pub fn new(id: EvalId, node: NodeAddr, start_time: f64, projects: Vec<ProjectRecord>) -> EvalRecord {
        EvalRecord {
            id,
            submitted_to: node,
            responsible: node,
            term: 1,
            version: 0,
            start_time,
            end_time: None,
            projects,
            running: BTreeMap::new(),
            results: BTreeMap::new(),
            worker_deaths: BTreeMap::new(),
            rerun_of: None,
        }
    }

    /// Checks what a peer's copy may not get wrong: ids, addresses, content hashes (64 lowercase
    /// hex digits: they name files), names (no path separators or control characters) and
    /// module paths (relative, inside the project).
    pub fn validate(&self) -> Result<(), String> {
        if self.rerun_of == Some(self.id) {
            return Err(format!("evaluation {}: invalid rerun_of", self.id));
        }
        for (t, r) in &self.results {
            r.report.check_attempts().map_err(|e| format!("result of {t}: {e}"))?;
        }
        for (i, p) in self.projects.iter().enumerate() {
            if p.id != ProjectId::of(self.id, i) {
                return Err(format!("project id {} is not {}", p.id, ProjectId::of(self.id, i)));
            }
            if !is_sha256_hex(&p.content_hash) {
                return Err(format!("project {}: content hash is not 64 lowercase hex digits", p.id));
            }
            if !valid_project_name(&p.name) {
                return Err(format!("project {}: invalid name", p.id));
            }
            if p.url.as_deref().is_some_and(|u| u.chars().any(char::is_control)) {
                return Err(format!("project {}: invalid url", p.id));
            }
            if let ProjectState::Ready { modules, runner, .. } = &p.state {
                if runner.is_empty()
                    || !runner.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return Err(format!("project {}: invalid runner name", p.id));
                }
                if let Some(m) = modules.iter().find(|m| !valid_module_path(m)) {
                    return Err(format!(
                        "project {}: module {:?} is not a relative path inside it",
                        p.id,
                        clip(m)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Counts a death of the worker running `task_id`; returns how many it has killed.
    pub fn worker_died(&mut self, task_id: &TaskId) -> u32 {
        let n = self.worker_deaths.entry(task_id.clone()).or_insert(0);
        *n = n.saturating_add(1).min(MAX_WORKER_DEATHS);
        self.version += 1;
        *n
    }

    pub fn project(&self, project_id: &ProjectId) -> Option<&ProjectRecord> {
        self.projects.iter().find(|p| &p.id == project_id)
    }

    /// Every task of the evaluation's ready projects.
    pub fn all_tasks(&self) -> impl Iterator<Item = TaskRef<'_>> {
        self.projects.iter().flat_map(|p| {
            p.modules().iter().flat_map(move |m| {
                p.module_tasks(m).into_iter().map(move |t| TaskRef { task_id: t, project: p })
            })
        })
    }

    /// Task ids that have no result yet.
    pub fn unfinished_tasks(&self) -> Vec<TaskId> {
        self.all_tasks().map(|t| t.task_id).filter(|t| !self.results.contains_key(t)).collect()
    }

    /// True when every project is settled and every task has a result.
    pub fn is_complete(&self) -> bool {
        self.projects.iter().all(|p| p.state.rank() > 0) && self.unfinished_tasks().is_empty()
    }

    /// Sets `end_time` if the evaluation just completed. Returns whether it changed.
    pub fn settle(&mut self, now: f64) -> bool {
        if self.end_time.is_none() && self.is_complete() {
            self.end_time = Some(now);
            self.running.clear();
            return true;
        }
        false
    }

    /// Whether `task_id` names a task (a module or a chunk) of this evaluation.
    pub fn knows_task(&self, task_id: &TaskId) -> bool {
        self.project(task_id.project())
            .is_some_and(|p| p.module_tasks(task_id.module()).iter().any(|t| t == task_id))
    }

    /// Stores a result unless the task has one already (the first accepted result wins).
    /// Returns whether the record changed.
    pub fn add_result(&mut self, task_id: &TaskId, result: ModuleResult, now: f64) -> bool {
        if self.results.contains_key(task_id) {
            return false;
        }
        self.results.insert(task_id.clone(), result);
        self.running.remove(task_id);
        self.version += 1;
        self.settle(now);
        true
    }

    /// The record without its results, as JSON: what the store keeps per evaluation (results are
    /// stored one by one) and what tells whether anything but the results changed.
    pub fn header_json(&self) -> String {
        serde_json::to_string(&self.clone_header()).unwrap_or_default()
    }

    /// This record with only the given results (a replication delta; merging it adds them).
    pub fn delta<'a>(&self, results: impl IntoIterator<Item = &'a TaskId>) -> EvalRecord {
        let mut out = self.clone_header();
        for t in results {
            if let Some(r) = self.results.get(t) {
                out.results.insert(t.clone(), r.clone());
            }
        }
        out
    }

    /// A copy without results.
    pub fn clone_header(&self) -> EvalRecord {
        EvalRecord {
            id: self.id,
            submitted_to: self.submitted_to,
            responsible: self.responsible,
            term: self.term,
            version: self.version,
            start_time: self.start_time,
            end_time: self.end_time,
            projects: self.projects.clone(),
            running: self.running.clone(),
            results: BTreeMap::new(),
            worker_deaths: self.worker_deaths.clone(),
            rerun_of: self.rerun_of,
        }
    }

    /// Merges another copy (or a delta) of the same evaluation into this one. What a copy
    /// cannot do: replace an accepted result, add a result for a task this record does not
    /// know, add or remove projects, or change a project that is no longer preparing.
    pub fn merge(&mut self, other: &EvalRecord) -> Merged {
        let mut merged = Merged::default();
        let mut header = false;
        if (other.term, other.version) > (self.term, self.version)
            || ((other.term, other.version) == (self.term, self.version)
                && other.responsible < self.responsible)
        {
            header = true;
            self.term = other.term;
            self.version = other.version;
            self.responsible.clone_from(&other.responsible);
            self.running.clone_from(&other.running);
        }
        if other.start_time < self.start_time - SAME_INSTANT {
            header = true;
            self.start_time = other.start_time;
        }
        // Set when the rerun is submitted; the smaller id wins should two copies disagree.
        let rerun_of = match (self.rerun_of, other.rerun_of) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if rerun_of != self.rerun_of {
            header = true;
            self.rerun_of = rerun_of;
        }
        for p in &other.projects {
            if let Some(q) = self.projects.iter_mut().find(|q| q.id == p.id)
                && q.content_hash == p.content_hash
                && matches!(q.state, ProjectState::Preparing)
                && !matches!(p.state, ProjectState::Preparing)
            {
                header = true;
                q.state = p.state.clone();
            }
        }
        for (t, r) in &other.results {
            if !self.results.contains_key(t) && self.knows_task(t) {
                self.results.insert(t.clone(), r.clone());
                merged.results.push(t.clone());
            }
        }
        for (t, n) in &other.worker_deaths {
            let mine = self.worker_deaths.entry(t.clone()).or_insert(0);
            let max = (*mine).max((*n).min(MAX_WORKER_DEATHS));
            header |= max != *mine;
            *mine = max;
        }
        let before = self.running.len();
        let results = &self.results;
        self.running.retain(|t, _| !results.contains_key(t));
        header |= self.running.len() != before;
        let end = match (self.end_time, other.end_time) {
            (Some(a), Some(b)) if b < a - SAME_INSTANT => Some(b),
            (a, b) => a.or(b),
        };
        header |= end != self.end_time;
        self.end_time = end;
        if self.end_time.is_none() {
            let latest = self.results.values().map(|r| r.finished_at).fold(self.start_time, f64::max);
            header |= self.settle(latest);
        }
        merged.header = header;
        merged
    }

    /// Counts of the whole evaluation.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for r in self.results.values() {
            c.merge(&r.report.counts());
        }
        c
    }

    /// Progress of one module of a project: its tasks' results and running workers.
    pub fn module_progress<'a>(&'a self, p: &ProjectRecord, module: &str) -> ModuleProgress<'a> {
        let tasks = p.module_tasks(module);
        ModuleProgress {
            results: tasks.iter().filter_map(|t| self.results.get(t)).collect(),
            running: tasks.iter().filter_map(|t| self.running.get(t).copied()).collect(),
            tasks: tasks.len(),
        }
    }
}

/// What a merge changed.
#[derive(Debug, Default, PartialEq)]
pub struct Merged {
    /// Anything but the results.
    pub header: bool,
    /// Task ids whose result was added.
    pub results: Vec<TaskId>,
}

impl Merged {
    pub fn changed(&self) -> bool {
        self.header || !self.results.is_empty()
    }
}

/// The state of one module's tasks (one task, or one per chunk).
#[derive(Debug)]
pub struct ModuleProgress<'a> {
    pub results: Vec<&'a ModuleResult>,
    pub running: Vec<NodeAddr>,
    pub tasks: usize,
}

impl ModuleProgress<'_> {
    /// Every task of the module has a result.
    pub fn finished(&self) -> bool {
        self.tasks > 0 && self.results.len() == self.tasks
    }

    /// Some task runs or has finished, not all have.
    pub fn started(&self) -> bool {
        !self.finished() && (!self.running.is_empty() || !self.results.is_empty())
    }

    /// `finished`, `running` (started) or `pending`.
    pub fn status(&self) -> crate::wire::ModuleStatus {
        if self.finished() {
            crate::wire::ModuleStatus::Finished
        } else if self.started() {
            crate::wire::ModuleStatus::Running
        } else {
            crate::wire::ModuleStatus::Pending
        }
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for r in &self.results {
            c.merge(&r.report.counts());
        }
        c
    }

    /// Seconds the module's tasks took together.
    pub fn duration(&self) -> f64 {
        // From +0.0: an empty f64 `sum()` is -0.0, which JSON shows as `-0.0` for a pending module.
        self.results.iter().fold(0.0, |total, r| total + r.report.duration)
    }

    pub fn tests(&self) -> Vec<TestResult> {
        self.results.iter().flat_map(|r| r.report.tests.iter().cloned()).collect()
    }

    /// The nodes that ran (or run) it, `, `-separated; `None` when none.
    pub fn nodes(&self) -> Option<String> {
        let mut seen: Vec<String> = Vec::new();
        for n in
            self.results.iter().map(|r| r.node).chain(self.running.iter().copied()).map(|n| n.to_string())
        {
            if !seen.contains(&n) {
                seen.push(n);
            }
        }
        (!seen.is_empty()).then(|| seen.join(", "))
    }

    /// Notes of the module's runs.
    pub fn note(&self) -> Option<String> {
        let notes: Vec<&str> = self.results.iter().filter_map(|r| r.report.note.as_deref()).collect();
        (!notes.is_empty()).then(|| notes.join("; "))
    }

    /// Output the module's runs kept (of modules that did not come out clean), in task order.
    pub fn output(&self) -> Option<String> {
        let outputs: Vec<&str> = self.results.iter().filter_map(|r| r.report.output.as_deref()).collect();
        (!outputs.is_empty()).then(|| outputs.join("\n"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use cdtester_runner_api::{Outcome, TestResult};

    use super::*;

    pub fn module_report(module: &str, outcomes: &[Outcome]) -> ModuleReport {
        ModuleReport {
            module: module.into(),
            tests: outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| TestResult {
                    nodeid: format!("{module}::test_{i}"),
                    outcome: *o,
                    duration: 0.01,
                    message: (*o == Outcome::Failed).then(|| "assert 1 == 2".to_string()),
                    attempts: Vec::new(),
                })
                .collect(),
            duration: 0.5,
            note: None,
            output: None,
            output_truncated: false,
        }
    }

    pub fn ready(id: &str, name: &str, modules: &[&str]) -> ProjectRecord {
        ProjectRecord {
            id: id.parse().expect("a valid project id"),
            name: name.into(),
            url: None,
            content_hash: "h".into(),
            state: ProjectState::Ready {
                modules: modules.iter().map(|m| m.to_string()).collect(),
                runner: "local".into(),
                limits: Limits::default(),
                policies: vec![],
                chunks: BTreeMap::new(),
            },
        }
    }

    pub fn result(node: &str, attempt: &str, report: ModuleReport) -> ModuleResult {
        ModuleResult { node: NodeAddr::test(node), attempt: attempt.into(), finished_at: 2.0, report }
    }

    #[test]
    fn results_are_idempotent_and_complete_the_evaluation() {
        let mut rec = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:7001"),
            1.0,
            vec![ready("7-0", "calc", &["t_a.py", "t_b.py"])],
        );
        assert_eq!(rec.unfinished_tasks().len(), 2);
        let r = result("127.0.0.1:7002", "b", module_report("t_a.py", &[Outcome::Passed, Outcome::Failed]));
        assert!(rec.add_result(&TaskId::test("7-0::t_a.py"), r.clone(), 3.0));
        assert!(!rec.add_result(&TaskId::test("7-0::t_a.py"), r, 3.0), "duplicate result ignored");
        assert!(rec.end_time.is_none());
        rec.add_result(
            &TaskId::test("7-0::t_b.py"),
            result("127.0.0.1:7001", "c", module_report("t_b.py", &[Outcome::Passed])),
            4.0,
        );
        assert_eq!(rec.end_time, Some(4.0));
        let c = rec.counts();
        assert_eq!((c.passes(), c.failures()), (2, 1));
    }

    #[test]
    fn a_copy_read_back_from_json_is_the_same_record_and_merges_as_no_change() {
        // A wall-clock timestamp whose shortest spelling serde_json reads back one bit lower
        // (its default float parsing is not exact).
        let t = 1_800_000_807.876_197_3;
        let mut rec = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:7001"),
            t,
            vec![ready("7-0", "calc", &["t_a.py"])],
        );
        rec.add_result(
            &TaskId::test("7-0::t_a.py"),
            result("127.0.0.1:7002", "z", module_report("t_a.py", &[Outcome::Passed])),
            t + 1.5,
        );
        let copy: EvalRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert!((copy.start_time - rec.start_time).abs() < 1e-6);
        assert!(!rec.merge(&copy).changed(), "a copy that went through JSON changed the record");
    }

    #[test]
    fn merge_keeps_accepted_results_and_prefers_higher_term() {
        let base = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:7001"),
            1.0,
            vec![ready("7-0", "calc", &["t_a.py", "t_b.py"])],
        );
        let mut a = base.clone();
        a.add_result(
            &TaskId::test("7-0::t_a.py"),
            result("127.0.0.1:7002", "z", module_report("t_a.py", &[Outcome::Passed])),
            3.0,
        );
        let mut b = base.clone();
        b.term = 2;
        b.responsible = NodeAddr::test("127.0.0.1:7003");
        b.add_result(
            &TaskId::test("7-0::t_a.py"),
            result("127.0.0.1:7003", "a", module_report("t_a.py", &[Outcome::Failed])),
            3.0,
        );
        b.add_result(
            &TaskId::test("7-0::t_b.py"),
            result("127.0.0.1:7003", "x", module_report("t_b.py", &[Outcome::Passed])),
            5.0,
        );
        let mut ab = a.clone();
        assert!(ab.merge(&b).changed());
        assert_eq!(ab.responsible, NodeAddr::test("127.0.0.1:7003"));
        assert_eq!(
            ab.results[&TaskId::test("7-0::t_a.py")].attempt,
            "z",
            "an accepted result is never replaced"
        );
        assert!(ab.end_time.is_some());
        assert!(!ab.clone().merge(&ab).changed(), "merging an equal copy changes nothing");
        let mut partial = a.clone();
        let delta = b.delta([TaskId::test("7-0::t_b.py")].iter());
        assert_eq!(delta.results.len(), 1);
        let m = partial.merge(&delta);
        assert!(m.header, "the higher term's responsibility is adopted");
        assert_eq!(m.results, vec![TaskId::test("7-0::t_b.py")]);
    }

    #[test]
    fn a_copy_cannot_add_projects_unknown_tasks_or_change_settled_projects() {
        let mut mine = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:7001"),
            1.0,
            vec![ready("7-0", "calc", &["t_a.py"])],
        );
        let mut forged = mine.clone();
        forged.projects.push(ready("7-1", "extra", &["t_x.py"]));
        if let ProjectState::Ready { runner, modules, .. } = &mut forged.projects[0].state {
            *runner = "evil".into();
            modules.push("t_new.py".into());
        }
        forged.projects[0].content_hash = "../../etc/passwd".into();
        forged.results.insert(
            TaskId::test("7-1::t_x.py"),
            result("127.0.0.1:7009", "a", module_report("t_x.py", &[Outcome::Passed])),
        );
        forged.results.insert(
            TaskId::test("7-0::t_new.py"),
            result("127.0.0.1:7009", "a", module_report("t_new.py", &[Outcome::Passed])),
        );
        let before = mine.clone();
        assert!(!mine.merge(&forged).changed(), "{mine:?}");
        assert_eq!(mine, before);
    }

    #[test]
    fn records_with_unsafe_fields_are_invalid() {
        let good = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:7000"),
            1.0,
            vec![ready("7-0", "calc", &["t_a.py"])],
        );
        let mut good = good;
        good.projects[0].content_hash = "a".repeat(64);
        assert_eq!(good.validate(), Ok(()));
        type Mutation = Box<dyn Fn(&mut EvalRecord)>;
        let bad: Vec<Mutation> = vec![
            Box::new(|r| r.projects[0].content_hash = "../../x".into()),
            Box::new(|r| r.projects[0].content_hash = "A".repeat(64)),
            Box::new(|r| r.projects[0].id = ProjectId::of(EvalId::test(8), 0)),
            Box::new(|r| r.projects[0].name = "a/b".into()),
            Box::new(|r| r.rerun_of = Some(r.id)),
            Box::new(|r| {
                let mut report = module_report("t_a.py", &[Outcome::Flaky]);
                report.tests[0].message = Some("no attempts".into());
                r.results.insert(TaskId::test("7-0::t_a.py"), result("127.0.0.1:7001", "a", report));
            }),
            Box::new(|r| {
                if let ProjectState::Ready { modules, .. } = &mut r.projects[0].state {
                    modules.push("../outside.py".into());
                }
            }),
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut r = good.clone();
            f(&mut r);
            assert!(r.validate().is_err(), "case {i}: {r:?}");
        }
        // A project id with CR/LF (it names a file and a path) does not even decode.
        let mut json = serde_json::to_value(&good).expect("json");
        json["projects"][0]["id"] = serde_json::json!("7-0\r\nx");
        assert!(serde_json::from_value::<EvalRecord>(json).is_err());
    }

    fn arb_record() -> impl proptest::strategy::Strategy<Value = EvalRecord> {
        use proptest::prelude::*;
        let outcome = prop_oneof![Just(Outcome::Passed), Just(Outcome::Failed), Just(Outcome::Skipped)];
        (
            1u64..4,
            0u64..4,
            proptest::collection::btree_map(
                0usize..4,
                (proptest::collection::vec(outcome, 0..4), "[a-z]{1,3}"),
                0..4,
            ),
        )
            .prop_map(|(term, version, res)| {
                let mods = ["t_0.py", "t_1.py", "t_2.py", "t_3.py"];
                let mut r = EvalRecord::new(
                    EvalId::test(7),
                    NodeAddr::test("127.0.0.1:7001"),
                    1.0,
                    vec![ready("7-0", "calc", &mods)],
                );
                r.term = term;
                r.version = version;
                for (m, (outcomes, attempt)) in res {
                    r.results.insert(
                        TaskId::test(&format!("7-0::{}", mods[m])),
                        result("127.0.0.1:7000", &attempt, module_report(mods[m], &outcomes)),
                    );
                }
                r
            })
    }

    proptest::proptest! {
        /// Whatever copy arrives, an accepted result is never replaced or removed and the counts
        /// never go down.
        #[test]
        fn merge_never_replaces_results_or_lowers_counts(a in arb_record(), b in arb_record()) {
            let mut m = a.clone();
            m.merge(&b);
            for (t, r) in &a.results {
                proptest::prop_assert_eq!(m.results.get(t), Some(r));
            }
            let (before, after) = (a.counts(), m.counts());
            proptest::prop_assert!(after.total() >= before.total());
            proptest::prop_assert!(after.passes() >= before.passes());
            proptest::prop_assert!(after.failures() >= before.failures());
            let again = m.clone();
            proptest::prop_assert!(!m.merge(&b).changed() || m == again);
        }
    }

    #[test]
    fn chunked_modules_are_several_tasks() {
        let mut p = ready("7-0", "calc", &["t_a.py", "t_b.py"]);
        if let ProjectState::Ready { chunks, .. } = &mut p.state {
            chunks.insert("t_b.py".into(), 3);
        }
        let rec = EvalRecord::new(EvalId::test(7), NodeAddr::test("127.0.0.1:7001"), 1.0, vec![p]);
        let ids: Vec<String> = rec.all_tasks().map(|t| t.task_id.to_string()).collect();
        assert_eq!(ids, ["7-0::t_a.py", "7-0::t_b.py#0/3", "7-0::t_b.py#1/3", "7-0::t_b.py#2/3"]);
        assert!(rec.knows_task(&TaskId::test("7-0::t_b.py#2/3")));
        assert!(!rec.knows_task(&TaskId::test("7-0::t_b.py")), "a chunked module is no task itself");
        assert!("7-0::t_b.py#3/3".parse::<TaskId>().is_err(), "no chunk 3 of 3");
        let chunk = rec.all_tasks().nth(2).map(|t| (t.task_id.module().to_string(), t.task_id.chunk()));
        assert_eq!(chunk, Some(("t_b.py".to_string(), Some(Chunk { index: 1, count: 3 }))));
    }

    #[test]
    fn a_pending_module_took_plus_zero_seconds() {
        let p = ready("7-0", "calc", &["t_a.py"]);
        let rec = EvalRecord::new(EvalId::test(7), NodeAddr::test("127.0.0.1:7001"), 1.0, vec![p.clone()]);
        let d = rec.module_progress(&p, "t_a.py").duration();
        assert!(d == 0.0 && d.is_sign_positive(), "{d}");
        assert_eq!(serde_json::to_string(&d).expect("json"), "0.0");
    }

    #[test]
    fn merge_adopts_discovered_modules() {
        let mut pending = ready("7-0", "calc", &[]);
        pending.state = ProjectState::Preparing;
        let mut a = EvalRecord::new(EvalId::test(7), NodeAddr::test("127.0.0.1:7001"), 1.0, vec![pending]);
        let b = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:7001"),
            1.0,
            vec![ready("7-0", "calc", &["t_a.py"])],
        );
        assert!(!a.is_complete());
        assert!(a.merge(&b).header);
        assert_eq!(a.unfinished_tasks(), vec![TaskId::test("7-0::t_a.py")]);
        assert!(a.knows_task(&TaskId::test("7-0::t_a.py")));
        assert!(!a.knows_task(&TaskId::test("7-0::t_x.py")));
    }
}
