//! What a cdtester node keeps about work owned by nodes of the earlier Python implementation
//! ("reference nodes", `research/reference.md`): their identifiers, the evaluations they own as
//! their CACHE_UPDATEs describe them, and the reference's report of such an evaluation. Pure data
//! and rules; the I/O is in `app::reference`.
//!
//! Reference ids are strings (22-digit evaluation ids, `<float time><node id>` project ids,
//! `test_x.py` module names). They never become cdtester [`crate::ids::EvalId`]s: everything
//! owned by a reference node lives here, apart from cdtester's own records.
//!
//! Everything comes from peers that cannot authenticate: ids are checked
//! ([`valid_id`]), and the view is capped ([`MAX_EVALUATIONS`], [`MAX_PROJECTS`],
//! [`MAX_MODULES`]) so that a peer cannot grow it without bound.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::wire::{CacheContent, EvalMap, EvaluationEntry, ModuleEntry, ModuleStatus, ProjectEntry};

/// Most reference evaluations kept.
pub const MAX_EVALUATIONS: usize = 4_096;
/// Most reference projects kept.
pub const MAX_PROJECTS: usize = 16_384;
/// Most modules kept per reference project.
pub const MAX_MODULES: usize = 2_048;
/// Longest reference id accepted.
pub const MAX_ID_LEN: usize = 64;
/// Largest test count a reference worker's result may carry for a module.
pub const MAX_COUNT: u64 = 1_000_000;

/// Whether `id` is an acceptable reference id: 1 to 64 characters of `[0-9A-Za-z_.-]`, not made
/// of dots only (`.` and `..` name folders, the reference's `/file/..` flaw F4).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !id.bytes().all(|b| b == b'.')
}

/// Whether `module` is a module name as the reference sends it: a valid id that is a Python
/// file name (`test_x.py`), not hidden.
pub fn valid_module(module: &str) -> bool {
    valid_id(module) && module.ends_with(".py") && !module.starts_with('.')
}

/// The reference's task id: `<project_id>::<module>`.
pub fn task_id(project_id: &str, module: &str) -> String {
    format!("{project_id}::{module}")
}

/// Evaluations owned by reference nodes, merged from CACHE_UPDATEs with the reference's rules.
#[derive(Debug, Default)]
pub struct View {
    /// Evaluation id → (arrival order, entry).
    evals: HashMap<String, (u64, EvaluationEntry)>,
    projects: HashMap<String, ProjectEntry>,
    next: u64,
}

impl View {
    /// Merges the reference-owned part of a CACHE_UPDATE: evaluations whose id `ours` does not
    /// claim, and the projects they list. Unknown entries are copied; for known ones the project
    /// lists are united, an end time is adopted when none is known, and a module takes the
    /// remote state when it is new or finished remotely, or running remotely while pending here
    /// (§2.3). A project's `node` changes only by [`View::responsibility`].
    pub fn merge(&mut self, content: &CacheContent, ours: impl Fn(&str) -> bool) {
        for (id, e) in &content.evaluations {
            if ours(id) || !valid_id(id) {
                continue;
            }
            let room = self.evals.len() < MAX_EVALUATIONS;
            let projects = e.projects.iter().filter(|p| valid_id(p));
            match self.evals.get_mut(id) {
                Some((_, known)) => {
                    for p in projects {
                        if !known.projects.contains(p) && known.projects.len() < MAX_MODULES {
                            known.projects.push(p.clone());
                        }
                    }
                    if known.end_time.is_none() {
                        known.end_time = e.end_time;
                    }
                }
                None if room => {
                    let entry = EvaluationEntry {
                        projects: projects.take(MAX_MODULES).cloned().collect(),
                        start_time: e.start_time,
                        end_time: e.end_time,
                    };
                    self.evals.insert(id.clone(), (self.next, entry));
                    self.next += 1;
                }
                None => {}
            }
        }
        for (id, p) in &content.projects {
            if self.listed(id) {
                self.merge_project(id, p);
            }
        }
    }

    fn listed(&self, project: &str) -> bool {
        self.projects.contains_key(project)
            || self.evals.values().any(|(_, e)| e.projects.iter().any(|p| p == project))
    }

    fn merge_project(&mut self, id: &str, remote: &ProjectEntry) {
        if !self.projects.contains_key(id) && self.projects.len() >= MAX_PROJECTS {
            return;
        }
        let known = self.projects.entry(id.to_string()).or_insert_with(|| ProjectEntry {
            project_name: remote.project_name.chars().take(MAX_ID_LEN * 2).collect(),
            node: remote.node.chars().take(MAX_ID_LEN).collect(),
            modules: BTreeMap::new(),
        });
        for (name, m) in &remote.modules {
            if !valid_module(name) {
                continue;
            }
            let room = known.modules.len() < MAX_MODULES;
            match known.modules.get_mut(name) {
                Some(local) => {
                    let running = m.status == ModuleStatus::Running && local.status == ModuleStatus::Pending;
                    if m.status == ModuleStatus::Finished {
                        *local = m.clone();
                    } else if running {
                        local.status = ModuleStatus::Running;
                    }
                }
                None if room => {
                    known.modules.insert(name.clone(), m.clone());
                }
                None => {}
            }
        }
    }

    /// EVALUATION_RESPONSIBILITY_UPDATE: `project` is now owned by `node` (`ip:port`).
    pub fn responsibility(&mut self, project: &str, node: &str) {
        if let Some(p) = self.projects.get_mut(project) {
            p.node = node.chars().take(MAX_ID_LEN).collect();
        }
    }

    /// A failed node's responsibilities move to `me` (both `ip:port`): every project `failed`
    /// was responsible for, and those the election `named` (evaluation → projects, as peers
    /// said) whose owner is not `live` (a forged name cannot move a live node's project), of
    /// evaluations without an end time. Returns the projects this node owns now (known ones
    /// only: a project no CACHE_UPDATE described has no name or evaluation to run it under).
    pub fn take_over(
        &mut self,
        failed: &str,
        me: &str,
        named: &EvalMap,
        live: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut taken = Vec::new();
        for (_, e) in self.evals.values().filter(|(_, e)| e.end_time.is_none()) {
            for pid in &e.projects {
                let listed = named.values().any(|ps| ps.contains(pid));
                let Some(p) = self.projects.get_mut(pid) else { continue };
                if (p.node == failed || (listed && !live(&p.node))) && !taken.contains(pid) {
                    p.node = me.chars().take(MAX_ID_LEN).collect();
                    taken.push(pid.clone());
                }
            }
        }
        taken
    }

    /// The name of a project `me` is responsible for whose modules no CACHE_UPDATE listed (its
    /// owner died before publishing them): they are to be discovered again.
    pub fn undiscovered(&self, me: &str, project: &str) -> Option<String> {
        let p = self.projects.get(project).filter(|p| p.node == me && p.modules.is_empty())?;
        Some(p.project_name.clone())
    }

    /// Adds discovered modules (reference names, pending) to a project `me` is responsible for
    /// that has none yet.
    pub fn discovered(&mut self, me: &str, project: &str, modules: &[String]) {
        let Some(p) = self.projects.get_mut(project).filter(|p| p.node == me && p.modules.is_empty()) else {
            return;
        };
        for m in modules.iter().filter(|m| valid_module(m)).take(MAX_MODULES) {
            let pending = ModuleEntry { passed: 0, failed: 0, time: 0.0, status: ModuleStatus::Pending };
            p.modules.insert(m.clone(), pending);
        }
    }

    /// The modules of a project that have no result yet.
    pub fn unfinished(&self, project: &str) -> Vec<String> {
        self.projects.get(project).map_or_else(Vec::new, |p| {
            p.modules
                .iter()
                .filter(|(_, m)| m.status != ModuleStatus::Finished)
                .map(|(n, _)| n.clone())
                .collect()
        })
    }

    /// The project's name and the evaluation listing it, when `me` is responsible for it and
    /// `module` of it has no result yet: what a task of it needs.
    pub fn owned_task(&self, me: &str, project: &str, module: &str) -> Option<(String, String)> {
        let p = self.projects.get(project).filter(|p| p.node == me)?;
        let open = p.modules.get(module).is_some_and(|m| m.status != ModuleStatus::Finished);
        let eval = self.evals.iter().find(|(_, (_, e))| e.projects.iter().any(|x| x == project))?.0;
        open.then(|| (p.project_name.clone(), eval.clone()))
    }

    /// Marks a module of a project `me` is responsible for running (a task started or was
    /// confirmed).
    pub fn running(&mut self, me: &str, project: &str, module: &str) {
        let p = self.projects.get_mut(project).filter(|p| p.node == me);
        if let Some(m) = p.and_then(|p| p.modules.get_mut(module))
            && m.status != ModuleStatus::Finished
        {
            m.status = ModuleStatus::Running;
        }
    }

    /// Stores a module's result for a project `me` is responsible for, unless the module has
    /// one already (the first result wins); whether it was stored. Counts are capped at
    /// [`MAX_COUNT`], a time that is not a finite non-negative number becomes 0.
    pub fn record(
        &mut self,
        me: &str,
        project: &str,
        module: &str,
        passed: u64,
        failed: u64,
        time: f64,
    ) -> bool {
        let p = self.projects.get_mut(project).filter(|p| p.node == me);
        let Some(m) = p.and_then(|p| p.modules.get_mut(module)) else { return false };
        if m.status == ModuleStatus::Finished {
            return false;
        }
        let time = if time.is_finite() && time >= 0.0 { time } else { 0.0 };
        *m = ModuleEntry {
            passed: passed.min(MAX_COUNT),
            failed: failed.min(MAX_COUNT),
            time: round3(time),
            status: ModuleStatus::Finished,
        };
        true
    }

    /// Sets the end time (`now`, seconds) of every evaluation with a project `me` is
    /// responsible for whose modules all have results and none of whose projects is still
    /// `discovering`, as the reference's owner does when it stores the last one; whether any
    /// ended.
    pub fn finish(&mut self, me: &str, now: f64, discovering: impl Fn(&str) -> bool) -> bool {
        let mut ended = false;
        for (_, e) in self.evals.values_mut().filter(|(_, e)| e.end_time.is_none()) {
            let projects: Vec<&ProjectEntry> =
                e.projects.iter().filter_map(|p| self.projects.get(p)).collect();
            let done = projects.len() == e.projects.len()
                && !e.projects.iter().any(|p| discovering(p))
                && projects.iter().any(|p| p.node == me)
                && projects.iter().all(|p| p.modules.values().all(|m| m.status == ModuleStatus::Finished));
            if done {
                e.end_time = Some(now);
                ended = true;
            }
        }
        ended
    }

    /// The part of this node's CACHE_UPDATE that reference nodes read for the evaluations
    /// with a project `me` is responsible for: those evaluations, their projects, and their
    /// ids as submitted here (a reference node that detects this node's failure recovers only
    /// those).
    pub fn add_owned(&self, me: &str, content: &mut CacheContent) {
        for (id, (_, e)) in &self.evals {
            if !e.projects.iter().any(|p| self.owner(p) == Some(me)) {
                continue;
            }
            content.evaluations.insert(id.clone(), e.clone());
            for pid in &e.projects {
                if let Some(p) = self.projects.get(pid) {
                    content.projects.insert(pid.clone(), p.clone());
                }
            }
            if e.end_time.is_none() {
                content.stats.submitted_evaluation.push(id.clone());
            }
        }
    }

    /// The unfinished evaluations each node (`ip:port`) is responsible for, by project: what
    /// an election carries for a failed node (the reference's map: evaluation → projects with
    /// a module without result, and here also those without modules yet).
    pub fn active(&self, into: &mut BTreeMap<String, EvalMap>) {
        for (id, (_, e)) in self.evals.iter().filter(|(_, (_, e))| e.end_time.is_none()) {
            for pid in &e.projects {
                let Some(p) = self.projects.get(pid) else { continue };
                // A project without modules yet counts too: its owner died before publishing them.
                if p.modules.is_empty() || p.modules.values().any(|m| m.status != ModuleStatus::Finished) {
                    let list = into.entry(p.node.clone()).or_default().entry(id.clone()).or_default();
                    if !list.contains(pid) {
                        list.push(pid.clone());
                    }
                }
            }
        }
    }

    /// The node responsible for a project (`ip:port`), as last heard.
    pub fn owner(&self, project: &str) -> Option<&str> {
        self.projects.get(project).map(|p| p.node.as_str())
    }

    /// Evaluation ids, in arrival order.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<(&u64, &String)> = self.evals.iter().map(|(id, (n, _))| (n, id)).collect();
        v.sort();
        v.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// Totals for `/stats` `all`: (passed, failed, projects, evaluations).
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        let mut passed = 0;
        let mut failed = 0;
        for p in self.projects.values() {
            for m in p.modules.values() {
                passed += m.passed;
                failed += m.failed;
            }
        }
        (passed, failed, self.projects.len() as u64, self.evals.len() as u64)
    }

    /// The evaluation's report exactly as a reference node answers `GET /evaluation/<id>`
    /// (§1.4), `now` in seconds since the epoch.
    pub fn report(&self, id: &str, now: f64) -> Option<Report> {
        let (_, e) = self.evals.get(id)?;
        let mut sum = Tally::default();
        let mut projects: Vec<(String, ProjectReport)> = Vec::new();
        for pid in &e.projects {
            let Some(p) = self.projects.get(pid) else { continue };
            let mut t = Tally::default();
            for m in p.modules.values() {
                t.add(m);
            }
            sum.merge(&t);
            let mut name = p.project_name.clone();
            if projects.iter().any(|(n, _)| *n == name) {
                name = format!("{name}_{}", projects.len());
            }
            projects.push((name, ProjectReport::new(&p.node, &t, &p.modules)));
        }
        Some(Report {
            id: id.to_string(),
            start_time: e.start_time,
            end_time: e.end_time,
            time_elapsed: e.end_time.unwrap_or(now) - e.start_time,
            summary: Summary {
                pass_percentage: sum.percent(sum.passed),
                fail_percentage: sum.percent(sum.failed),
                executed: sum.executed,
                executing: sum.executing,
                pending: sum.pending,
                time_elapsed: 0,
                total_passed: (sum.tests() > 0).then_some(sum.passed),
                total_failed: (sum.tests() > 0).then_some(sum.failed),
            },
            projects: Ordered(projects),
        })
    }
}

/// Module and test counts of a project or evaluation.
#[derive(Debug, Default)]
struct Tally {
    passed: u64,
    failed: u64,
    executed: u64,
    executing: u64,
    pending: u64,
}

impl Tally {
    fn add(&mut self, m: &ModuleEntry) {
        self.passed += m.passed;
        self.failed += m.failed;
        match m.status {
            ModuleStatus::Finished => self.executed += 1,
            ModuleStatus::Running => self.executing += 1,
            ModuleStatus::Pending => self.pending += 1,
        }
    }

    fn merge(&mut self, o: &Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.executed += o.executed;
        self.executing += o.executing;
        self.pending += o.pending;
    }

    fn tests(&self) -> u64 {
        self.passed + self.failed
    }

    /// `round(n / tests * 100, 2)`, or the integer 0 without tests.
    fn percent(&self, n: u64) -> Number {
        if self.tests() == 0 {
            Number::Int(0)
        } else {
            Number::Float(round2(n as f64 / self.tests() as f64 * 100.0))
        }
    }
}

/// Python's `round(x, 2)` (both round the exact binary value, ties to even).
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

/// A time rounded to milliseconds, as the reference's workers report it.
fn round3(x: f64) -> f64 {
    format!("{x:.3}").parse().unwrap_or(x)
}

/// A JSON number the reference writes as an integer or a float.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Number {
    Int(u64),
    Float(f64),
}

/// The reference's score: a number, or `"--"` while modules are unfinished or without tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Score {
    Value(f64),
    Pending(&'static str),
}

/// A JSON object whose keys keep the given order.
#[derive(Debug)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<V: Serialize> Serialize for Ordered<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `GET /evaluation/<id>` of a reference-owned evaluation (keys in the reference's order).
#[derive(Debug, Serialize)]
pub struct Report {
    pub id: String,
    pub start_time: f64,
    pub end_time: Option<f64>,
    pub time_elapsed: f64,
    pub summary: Summary,
    pub projects: Ordered<ProjectReport>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub pass_percentage: Number,
    pub fail_percentage: Number,
    pub executed: u64,
    pub executing: u64,
    pub pending: u64,
    pub time_elapsed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_passed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_failed: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ProjectReport {
    pub node: String,
    pub pass_percentage: Number,
    pub fail_percentage: Number,
    pub score: Score,
    pub modules: BTreeMap<String, ModuleEntry>,
    pub executed: u64,
    pub executing: u64,
    pub pending: u64,
}

impl ProjectReport {
    fn new(node: &str, t: &Tally, modules: &BTreeMap<String, ModuleEntry>) -> ProjectReport {
        let done = t.pending == 0 && t.executing == 0 && t.tests() > 0;
        ProjectReport {
            node: node.to_string(),
            pass_percentage: t.percent(t.passed),
            fail_percentage: t.percent(t.failed),
            score: if done {
                Score::Value(round2(t.passed as f64 / t.tests() as f64 * 20.0))
            } else {
                Score::Pending("--")
            },
            modules: modules.clone(),
            executed: t.executed,
            executing: t.executing,
            pending: t.pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CACHE_UPDATE content node1 sent after eval1 in the reference's live run (§8.3).
    fn capture() -> CacheContent {
        let text = r#"{"evaluations": {"1795512038648868597971": {"projects": ["1795512056.7615452179551203864886859797", "1795512056.762204179551203864886859797"], "start_time": 1795512056.7254164, "end_time": 1795512058.647059}}, "projects": {"1795512056.7615452179551203864886859797": {"project_name": "calc", "node": "127.0.0.1:8001", "modules": {"test_add.py": {"passed": 2, "failed": 1, "time": 0.144, "status": "finished"}, "test_sub.py": {"passed": 2, "failed": 0, "time": 0.11, "status": "finished"}}}, "1795512056.762204179551203864886859797": {"project_name": "strs", "node": "127.0.0.1:8001", "modules": {"test_fixture_error.py": {"passed": 1, "failed": 1, "time": 0.062, "status": "finished"}, "test_upper.py": {"passed": 2, "failed": 1, "time": 0.18, "status": "finished"}}}}, "stats": {"failed": 1, "passed": 4, "projects": 1, "modules": 2, "evaluations": ["1795512038648868597971"], "submitted_evaluation": ["1795512038648868597971"]}}"#;
        serde_json::from_str(text).expect("capture")
    }

    fn ours(id: &str) -> bool {
        id.parse::<u64>().is_ok()
    }

    #[test]
    fn the_report_is_the_references_byte_for_byte() {
        let mut v = View::default();
        v.merge(&capture(), ours);
        let report =
            serde_json::to_string(&v.report("1795512038648868597971", 0.0).expect("known")).expect("json");
        // §8.2, as every reference node answered it.
        let expected = r#"{"id":"1795512038648868597971","start_time":1795512056.7254164,"end_time":1795512058.647059,"time_elapsed":1.921642541885376,"summary":{"pass_percentage":70.0,"fail_percentage":30.0,"executed":4,"executing":0,"pending":0,"time_elapsed":0,"total_passed":7,"total_failed":3},"projects":{"calc":{"node":"127.0.0.1:8001","pass_percentage":80.0,"fail_percentage":20.0,"score":16.0,"modules":{"test_add.py":{"passed":2,"failed":1,"time":0.144,"status":"finished"},"test_sub.py":{"passed":2,"failed":0,"time":0.11,"status":"finished"}},"executed":2,"executing":0,"pending":0},"strs":{"node":"127.0.0.1:8001","pass_percentage":60.0,"fail_percentage":40.0,"score":12.0,"modules":{"test_fixture_error.py":{"passed":1,"failed":1,"time":0.062,"status":"finished"},"test_upper.py":{"passed":2,"failed":1,"time":0.18,"status":"finished"}},"executed":2,"executing":0,"pending":0}}}"#;
        let (a, b): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(&report).expect("a"), serde_json::from_str(expected).expect("b"));
        assert_eq!(a, b);
        assert_eq!(v.totals(), (7, 3, 2, 1));
        assert_eq!(v.ids(), vec!["1795512038648868597971".to_string()]);
    }

    #[test]
    fn merging_follows_the_references_rules_and_ignores_cdtester_records() {
        let mut v = View::default();
        let mut c = capture();
        c.evaluations.insert("123456789".into(), EvaluationEntry::default());
        let p = c.projects.values_mut().next().expect("project");
        for m in p.modules.values_mut() {
            m.status = ModuleStatus::Pending;
        }
        v.merge(&c, ours);
        assert_eq!(v.ids().len(), 1, "cdtester's evaluation is not a reference one");
        let report = v.report("1795512038648868597971", 1795512060.0).expect("known");
        assert_eq!(report.summary.pending, 2);
        assert_eq!(report.projects.0[0].1.score, Score::Pending("--"));
        // A finished remote module wins; the node changes only by a responsibility update.
        let mut again = capture();
        for p in again.projects.values_mut() {
            p.node = "10.0.0.9:1".into();
        }
        v.merge(&again, ours);
        let pid = "1795512056.7615452179551203864886859797";
        assert_eq!(v.owner(pid), Some("127.0.0.1:8001"));
        v.responsibility(pid, "127.0.0.1:8002");
        assert_eq!(v.owner(pid), Some("127.0.0.1:8002"));
        assert_eq!(v.report("1795512038648868597971", 0.0).expect("known").summary.executed, 4);
    }

    /// A CACHE_UPDATE adding project `pid` without modules (before its owner's discovery).
    fn lost_project(eval: &str, pid: &str, node: &str) -> CacheContent {
        let mut c = CacheContent::default();
        let entry = EvaluationEntry { projects: vec![pid.to_string()], start_time: 1.0, end_time: None };
        c.evaluations.insert(eval.to_string(), entry);
        let project =
            ProjectEntry { project_name: "lost".into(), node: node.into(), modules: BTreeMap::new() };
        c.projects.insert(pid.to_string(), project);
        c
    }

    #[test]
    fn a_taken_over_evaluation_is_run_to_its_end_as_the_references_recovery_node_does() {
        let (eval, calc, strs) = (
            "1795512038648868597971",
            "1795512056.7615452179551203864886859797",
            "1795512056.762204179551203864886859797",
        );
        let (dead, me) = ("127.0.0.1:8001", "127.0.0.1:9000");
        let mut c = capture();
        c.evaluations.values_mut().for_each(|e| e.end_time = None);
        let m = c.projects.get_mut(calc).and_then(|p| p.modules.get_mut("test_sub.py")).expect("module");
        m.status = ModuleStatus::Running;
        let mut v = View::default();
        v.merge(&c, ours);
        let mut active = BTreeMap::new();
        v.active(&mut active);
        assert_eq!(
            active,
            BTreeMap::from([(dead.to_string(), EvalMap::from([(eval.to_string(), vec![calc.to_string()])]))])
        );
        // Nothing is this node's before the takeover.
        assert!(!v.record(me, calc, "test_sub.py", 2, 0, 0.1));
        assert_eq!(v.owned_task(me, calc, "test_sub.py"), None);

        // A forged election naming a live node's project moves nothing.
        let forged = EvalMap::from([(eval.to_string(), vec![calc.to_string()])]);
        assert!(v.take_over("127.0.0.1:7", me, &forged, |n| n == dead).is_empty());
        let mut taken = v.take_over(dead, me, &EvalMap::new(), |_| true);
        taken.sort();
        assert_eq!(taken, vec![calc.to_string(), strs.to_string()], "every project of the dead node");
        assert_eq!(v.owner(calc), Some(me));
        assert_eq!(v.unfinished(calc), vec!["test_sub.py".to_string()]);
        assert_eq!(v.owned_task(me, calc, "test_sub.py"), Some(("calc".to_string(), eval.to_string())));
        assert_eq!(v.owned_task(me, calc, "test_add.py"), None, "finished already");
        assert_eq!(v.undiscovered(me, calc), None, "its modules are known");
        // A project whose modules were never published gets them from a new discovery.
        let lost = "1795512057.1179551203864886859797";
        v.merge(&lost_project(eval, lost, dead), ours);
        assert_eq!(v.take_over(dead, me, &EvalMap::new(), |_| true), vec![lost.to_string()]);
        assert_eq!(v.undiscovered(me, lost), Some("lost".to_string()));
        assert!(!v.finish(me, 10.0, |p| p == lost), "not before its discovery");
        v.discovered(me, lost, &["test_l.py".to_string(), "../x.py".to_string()]);
        assert_eq!(v.unfinished(lost), vec!["test_l.py".to_string()]);
        assert!(v.record(me, lost, "test_l.py", 1, 0, 0.1));
        let mut content = CacheContent::default();
        v.add_owned(me, &mut content);
        assert_eq!(content.stats.submitted_evaluation, vec![eval.to_string()]);
        assert_eq!(content.projects[calc].node, me);
        assert!(!v.finish(me, 10.0, |_| false), "a module is still running");

        // The first result wins; hostile numbers are capped.
        assert!(v.record(me, calc, "test_sub.py", u64::MAX, 0, f64::NAN));
        assert!(!v.record(me, calc, "test_sub.py", 2, 0, 0.11));
        let r = v.report(eval, 0.0).expect("report");
        assert_eq!(r.projects.0[0].1.modules["test_sub.py"].passed, MAX_COUNT);
        assert_eq!(r.projects.0[0].1.modules["test_sub.py"].time, 0.0);
        assert!(!v.finish(me, 10.0, |p| p == strs), "a project is still being discovered");
        assert!(v.finish(me, 10.0, |_| false));
        assert_eq!(v.report(eval, 0.0).expect("report").end_time, Some(10.0));
        let mut active = BTreeMap::new();
        v.active(&mut active);
        assert!(active.is_empty(), "{active:?}");
        // A later takeover of another node moves nothing of a finished evaluation.
        assert!(v.take_over(me, "127.0.0.1:9001", &EvalMap::new(), |_| false).is_empty());
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        for good in ["1795512038648868597971", "1795512056.7615452179551203864886859797", "a-b_c.d"] {
            assert!(valid_id(good), "{good:?}");
        }
        assert!(valid_module("test_add.py"));
        assert!(!valid_module(".hidden.py") && !valid_module("test_add") && !valid_module("tests/x.py"));
        let mut v = View::default();
        let mut c = capture();
        let e = c.evaluations.values().next().cloned().expect("eval");
        c.evaluations.insert("../etc".into(), e);
        v.merge(&c, ours);
        assert_eq!(v.ids(), vec!["1795512038648868597971".to_string()]);
    }
}
