//! The responsible node's side of task distribution (the queue, assignments, leases, worker
//! deaths, results) and the worker's side of the pull protocol.
//!
//! Grouping: a whole module this node's own slot takes, remembered to run in at most
//! [`GROUP_MODULE_SECS`], takes along other such modules of its project, longest first, while
//! their remembered times sum to at most a fair share of the waiting work per worker slot of
//! the network (and [`GROUP_MAX_SECS`]). The slot's runner may then run them in one session,
//! which it does only where that provably counts what each module counts alone (the local
//! runner's run-alone memory); every module still has its own task and result.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cdtester_runner_api::plan::ModuleStat;
use cdtester_runner_api::{Limits, ModuleReport};

use super::{Accepted, Action, Engine, Now, Refusal, Task, TaskPost, duration_key};
use crate::eval::{self, EvalRecord, ModuleResult, ProjectState};
use crate::ids::{EvalId, NodeAddr, TaskId};
use crate::wire::{Message, TaskConfirmData, TaskInfo, TaskSendData, TaskSourceKind};

/// Modules remembered as slower than this (seconds) run alone on their slot.
pub const GROUP_MODULE_SECS: f64 = 2.0;
/// Most remembered seconds of modules grouped on one slot.
pub const GROUP_MAX_SECS: f64 = 10.0;

/// Failed attempts (runner infrastructure errors) before a task is recorded as not runnable.
pub(super) const MAX_TASK_FAILURES: u32 = 3;

/// Lease of a confirmed task: twice the module time limit plus a minute for preparation.
fn lease(limits: &Limits) -> Duration {
    Duration::from_secs(limits.timeout_s.saturating_mul(2).saturating_add(60))
}

fn limits_of(rec: &EvalRecord, task_id: &TaskId) -> Limits {
    rec.project(task_id.project())
        .and_then(|p| match &p.state {
            ProjectState::Ready { limits, .. } => Some(limits.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A task handed to a worker (or run here) and not finished yet.
#[derive(Debug, Clone)]
pub(super) struct Assignment {
    eval: EvalId,
    worker: SocketAddr,
    confirmed: bool,
    since: Instant,
    deadline: Instant,
}

/// Who runs which task, for the evaluations this node schedules: the one table. A confirmed
/// assignment is published in the record's `running` (replicated, read by reports and by a
/// node taking over) by the same call that makes it, and withdrawn with it.
#[derive(Debug, Default)]
pub(super) struct Assignments {
    by_task: BTreeMap<TaskId, Assignment>,
    /// Every worker a task was handed to by this node (in this term), until it has a result: a
    /// worker whose assignment expired meanwhile (a false suspicion, a late confirm) still
    /// delivers an honest result, and the first one wins.
    handed: BTreeMap<TaskId, BTreeSet<SocketAddr>>,
}

impl Assignments {
    /// Hands `task` to `worker`; `confirmed` when it runs already (this node's own slot, or a
    /// worker adopted after a takeover). Returns whether the record changed.
    fn assign(
        &mut self,
        rec: &mut EvalRecord,
        task: &TaskId,
        worker: SocketAddr,
        confirmed: bool,
        now: Instant,
    ) -> bool {
        let deadline = now + lease(&limits_of(rec, task));
        let a = Assignment { eval: rec.id, worker, confirmed, since: now, deadline };
        self.by_task.insert(task.clone(), a);
        self.handed.entry(task.clone()).or_default().insert(worker);
        confirmed && publish(rec, task, worker)
    }

    /// The worker confirmed; returns whether the record changed.
    fn confirm(&mut self, rec: &mut EvalRecord, task: &TaskId, worker: SocketAddr) -> bool {
        match self.by_task.get_mut(task) {
            Some(a) if a.worker == worker && !a.confirmed => {
                a.confirmed = true;
                publish(rec, task, worker)
            }
            _ => false,
        }
    }

    /// Withdraws a task's assignment; returns it and whether the record changed.
    fn release(&mut self, rec: Option<&mut EvalRecord>, task: &TaskId) -> (Option<Assignment>, bool) {
        let a = self.by_task.remove(task);
        let changed = rec.is_some_and(|rec| {
            let removed = rec.running.remove(task).is_some();
            if removed {
                rec.version += 1;
            }
            removed
        });
        (a, changed)
    }

    /// The task has a result: forgets its assignment and who it was handed to.
    fn finish(&mut self, task: &TaskId) {
        self.by_task.remove(task);
        self.handed.remove(task);
    }

    /// Whether this node handed `task` to `worker` (and it has no result yet).
    fn was_handed(&self, task: &TaskId, worker: SocketAddr) -> bool {
        self.handed.get(task).is_some_and(|w| w.contains(&worker))
    }

    fn get(&self, task: &TaskId) -> Option<&Assignment> {
        self.by_task.get(task)
    }

    fn contains(&self, task: &TaskId) -> bool {
        self.by_task.contains_key(task)
    }
}

fn publish(rec: &mut EvalRecord, task: &TaskId, worker: SocketAddr) -> bool {
    rec.running.insert(task.clone(), NodeAddr::from(worker));
    rec.version += 1;
    true
}

impl Engine {
    /// Whether this node schedules `rec` now.
    fn schedules(&self, rec: &EvalRecord) -> bool {
        rec.responsible == self.me()
            && rec.end_time.is_none()
            && !self.held.contains(&rec.id)
            && !self.fence.in_phase1(rec.id)
            && self.quorum()
    }

    /// Whether `task` of `r` waits for a worker: no result (not even a provisional one), not
    /// handed out, and it has not killed its workers too often.
    fn waits(&self, r: &EvalRecord, task: &TaskId) -> bool {
        !r.results.contains_key(task)
            && !self.assignments.contains(task)
            && !self.fence.is_pending(r.id, task)
            && r.worker_deaths.get(task).is_none_or(|n| *n < eval::MAX_WORKER_DEATHS)
    }

    /// Whether a task of an evaluation this node schedules waits for a worker.
    pub(super) fn has_pending(&self) -> bool {
        self.evals
            .values()
            .filter(|r| self.schedules(r))
            .any(|r| r.all_tasks().any(|t| self.waits(r, &t.task_id)))
    }

    /// Picks the next task (longest remembered duration first, a chunk counting its share;
    /// unknown durations count as longest; then older evaluations first) and hands it to
    /// `worker`.
    pub(super) fn take_next(&mut self, now: Now, worker: SocketAddr, out: &mut Vec<Action>) -> Option<Task> {
        let mut best: Option<(f64, f64, Task)> = None;
        for r in self.evals.values().filter(|r| self.schedules(r)) {
            for t in r.all_tasks() {
                if !self.waits(r, &t.task_id) {
                    continue;
                }
                let est = self.remembered(&t.project.name, &t.task_id).unwrap_or(f64::INFINITY);
                let better = best.as_ref().is_none_or(|(e, start, b)| {
                    est.total_cmp(e)
                        .reverse()
                        .then(r.start_time.total_cmp(start))
                        .then(t.task_id.cmp(&b.task_id))
                        .is_lt()
                });
                if better {
                    let task = Task {
                        eval: r.id,
                        project: Some(t.project.clone()),
                        task_id: t.task_id,
                        from: None,
                        with: Vec::new(),
                    };
                    best = Some((est, r.start_time, task));
                }
            }
        }
        let (_, _, task) = best?;
        let local = worker == self.cfg.me;
        let rec = self.evals.get_mut(&task.eval)?;
        if self.assignments.assign(rec, &task.task_id, worker, local, now.mono) {
            self.changed(task.eval, &[], out);
        }
        Some(task)
    }

    /// TASK_REQUEST from an idle worker: hand it the next task.
    pub(super) fn hand_out(&mut self, now: Now, from: SocketAddr, out: &mut Vec<Action>) {
        let Some(id) = self.id.clone() else { return };
        if !self.peers.contains(&from) {
            tracing::debug!(worker = %from, "TASK_REQUEST from a node that is not a live member ignored");
            return;
        }
        let Some(task) = self.take_next(now, from, out) else { return };
        let name = task.project.map(|p| p.name).unwrap_or_default();
        let info = TaskInfo {
            project_id: task.task_id.project().to_string(),
            module: task.task_id.part().to_string(),
            project_name: name,
            api_port: self.cfg.http_port.to_string(),
            eval_id: Some(task.eval.to_string()),
            url: None,
            token: None,
            kind: TaskSourceKind::Zip,
        };
        tracing::debug!(task = %task.task_id, worker = %from, "TASK_SEND");
        out.push(Action::Send { to: from, msg: Message::TaskSend(TaskSendData { id, info }) });
    }

    /// TASK_SEND to this node as a worker: confirm and run it if a slot is free.
    pub(super) fn task_sent(&mut self, from: SocketAddr, info: TaskInfo, out: &mut Vec<Action>) {
        if self.busy >= self.cfg.slots {
            tracing::debug!(project = %info.project_id, "no free slot: not confirming");
            return;
        }
        let Some(eval) = info.eval_id.as_deref().and_then(|e| e.parse::<EvalId>().ok()) else {
            tracing::warn!(%from, "TASK_SEND without a cdtester evaluation id ignored");
            return;
        };
        let Ok(task_id) = TaskId::from_parts(&info.project_id, &info.module) else {
            tracing::warn!(%from, "TASK_SEND with an invalid project id or module ignored");
            return;
        };
        // A module the project's record does not list (a node that took this one for a reference
        // node before its first heartbeat sends the reference's module names): confirming would
        // hold the task for a lease that no result can end; unconfirmed, it is handed out again.
        let unknown = self.evals.get(&eval).and_then(|r| r.project(task_id.project())).is_some_and(|p| {
            matches!(p.state, ProjectState::Ready { .. })
                && !p.modules().iter().any(|m| m == task_id.module())
        });
        if unknown {
            tracing::warn!(%from, task = %task_id, "TASK_SEND of a module the project does not have ignored");
            return;
        }
        out.push(Action::Send {
            to: from,
            msg: Message::TaskConfirm(TaskConfirmData { task_id: task_id.to_string() }),
        });
        self.busy += 1;
        self.here.insert(task_id.clone());
        let project = self
            .evals
            .get(&eval)
            .and_then(|r| r.project(task_id.project()))
            .filter(|p| matches!(p.state, ProjectState::Ready { .. }))
            .cloned();
        out.push(Action::Run(Task { eval, task_id, project, from: Some(from), with: Vec::new() }));
    }

    /// The whole modules of `lead`'s project that its slot on this node runs along with it
    /// (see the module documentation), assigned to this node.
    pub(super) fn companions(&mut self, now: Now, lead: &Task, out: &mut Vec<Action>) -> Vec<TaskId> {
        let Some(project) = lead.project.as_ref().filter(|_| lead.task_id.chunk().is_none()) else {
            return Vec::new();
        };
        let small = |t: &TaskId| self.remembered(&project.name, t).filter(|s| *s <= GROUP_MODULE_SECS);
        let Some(mut total) = small(&lead.task_id) else { return Vec::new() };
        let budget = self.fair_share(total).min(GROUP_MAX_SECS);
        let Some(rec) = self.evals.get(&lead.eval) else { return Vec::new() };
        let mut candidates: Vec<(f64, TaskId)> = rec
            .all_tasks()
            .filter(|t| {
                t.task_id.chunk().is_none()
                    && t.task_id.project() == lead.task_id.project()
                    && self.waits(rec, &t.task_id)
            })
            .filter_map(|t| Some((small(&t.task_id)?, t.task_id)))
            .collect();
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut with = Vec::new();
        for (secs, task) in candidates {
            if total + secs <= budget {
                total += secs;
                with.push(task);
            }
        }
        let me = self.cfg.me;
        let Some(rec) = self.evals.get_mut(&lead.eval) else { return Vec::new() };
        let mut changed = false;
        for task in &with {
            changed |= self.assignments.assign(rec, task, me, true, now.mono);
        }
        if changed {
            self.changed(lead.eval, &[], out);
        }
        with
    }

    /// The remembered seconds of task `task` of project `name` (a chunk counts its share), when
    /// its module ran before.
    fn remembered(&self, name: &str, task: &TaskId) -> Option<f64> {
        let share = task.chunk().map_or(1.0, |c| f64::from(c.count));
        self.durations.get(&duration_key(name, task.module())).map(|s| s.secs / share)
    }

    /// The remembered seconds of the waiting tasks this node schedules, plus `taken`, per worker
    /// slot of the network (unknown modules count [`UNKNOWN_MODULE_SECS`]).
    fn fair_share(&self, taken: f64) -> f64 {
        use cdtester_runner_api::plan::UNKNOWN_MODULE_SECS;
        let slots = (self.peers.len() + 1) * self.cfg.slots.max(1);
        let waiting: f64 = self
            .evals
            .values()
            .filter(|r| self.schedules(r))
            .map(|r| {
                r.all_tasks()
                    .filter(|t| self.waits(r, &t.task_id))
                    .map(|t| self.remembered(&t.project.name, &t.task_id).unwrap_or(UNKNOWN_MODULE_SECS))
                    .sum::<f64>()
            })
            .sum();
        (waiting + taken) / slots as f64
    }

    /// TASK_CONFIRM: the worker runs the task now.
    pub(super) fn confirm(&mut self, from: SocketAddr, task: &TaskId, out: &mut Vec<Action>) {
        let Some(eval) = self.assignments.get(task).map(|a| a.eval) else {
            tracing::debug!(%task, worker = %from, "late or unknown TASK_CONFIRM ignored");
            return;
        };
        let Some(rec) = self.evals.get_mut(&eval) else { return };
        if self.assignments.confirm(rec, task, from) {
            self.changed(eval, &[], out);
        }
    }

    /// Withdraws a task's assignment, persisting the record when it changed.
    fn release(&mut self, eval: EvalId, task: &TaskId, out: &mut Vec<Action>) -> Option<Assignment> {
        let (a, changed) = self.assignments.release(self.evals.get_mut(&eval), task);
        if changed {
            self.changed(eval, &[], out);
        }
        a
    }

    /// A task this node handed to its own slot has finished there: whatever became of its
    /// result (accepted here, refused, or delivered because responsibility moved meanwhile), the
    /// slot no longer runs it, so a task still without a result is handed out again.
    pub(super) fn end_local_assignment(&mut self, task: &TaskId, out: &mut Vec<Action>) {
        let eval = match self.assignments.get(task) {
            Some(a) if a.worker == self.cfg.me => a.eval,
            _ => return,
        };
        self.release(eval, task, out);
    }

    /// Forgets the assignments of an evaluation another node is responsible for now.
    pub(super) fn drop_assignments_of(&mut self, eval: EvalId) {
        self.assignments.by_task.retain(|_, a| a.eval != eval);
        self.assignments.handed.retain(|t, _| t.project().eval() != Some(eval));
        self.fence.forget(eval);
    }

    /// Requeues the tasks whose worker did not confirm in time, overran its lease or left.
    pub(super) fn expire(&mut self, now: Now, out: &mut Vec<Action>) {
        let expired: Vec<(TaskId, EvalId)> = self
            .assignments
            .by_task
            .iter()
            .filter(|(_, a)| {
                if a.worker == self.cfg.me {
                    false
                } else if !a.confirmed {
                    now.mono.saturating_duration_since(a.since) >= self.cfg.confirm_timeout
                } else {
                    now.mono >= a.deadline || !self.peers.contains(&a.worker)
                }
            })
            .map(|(t, a)| (t.clone(), a.eval))
            .collect();
        for (t, eval) in expired {
            tracing::info!(task = %t, "requeueing task");
            self.release(eval, &t, out);
        }
    }

    /// Requeues every task handed to `worker` (it failed or left). When it `died`, the tasks it
    /// had confirmed count a worker death each.
    pub(super) fn requeue_worker(&mut self, now: Now, worker: SocketAddr, died: bool, out: &mut Vec<Action>) {
        let gone: Vec<(TaskId, EvalId)> = self
            .assignments
            .by_task
            .iter()
            .filter(|(_, a)| a.worker == worker)
            .map(|(t, a)| (t.clone(), a.eval))
            .collect();
        for (t, eval) in gone {
            let confirmed = self.release(eval, &t, out).is_some_and(|a| a.confirmed);
            if died && confirmed {
                self.task_killed_worker(now, eval, &t, out);
            }
        }
    }

    /// The worker running `task` died. A task that does this [`eval::MAX_WORKER_DEATHS`] times
    /// is recorded as crashed and never handed out again, so that one submission cannot take
    /// down node after node (during a takeover's first phase, once it ends).
    fn task_killed_worker(&mut self, now: Now, eval: EvalId, task: &TaskId, out: &mut Vec<Action>) {
        let Some(rec) = self.evals.get_mut(&eval) else { return };
        if rec.results.contains_key(task) || !rec.knows_task(task) {
            return;
        }
        rec.running.remove(task);
        let deaths = rec.worker_died(task);
        self.changed(eval, &[], out);
        self.assignments.finish(task);
        if deaths < eval::MAX_WORKER_DEATHS {
            tracing::warn!(%eval, %task, deaths, "the worker running this task died; requeued");
        } else if !self.fence.in_phase1(eval) && !self.held.contains(&eval) {
            self.record_crash(now, eval, task, deaths, out);
        }
    }

    /// Records a task that killed its worker `deaths` times as crashed.
    pub(super) fn record_crash(
        &mut self,
        now: Now,
        eval: EvalId,
        task: &TaskId,
        deaths: u32,
        out: &mut Vec<Action>,
    ) {
        tracing::error!(%eval, %task, "task killed its worker {deaths} times: recorded as crashed");
        let report = ModuleReport {
            module: task.module().to_string(),
            tests: Vec::new(),
            duration: 0.0,
            note: Some(format!(
                "crashed: killed its worker {deaths} times (the node running it died); not run again"
            )),
            output: None,
            output_truncated: false,
        };
        let result = ModuleResult {
            node: self.me(),
            attempt: format!("worker-deaths-{deaths}"),
            finished_at: now.wall,
            report,
        };
        self.propose_result(now, eval, (task, result), out);
    }

    /// Takes the tasks a record lists as running on workers other than `gone` into the
    /// assignments (after a takeover or a restart), so that their workers' results are accepted;
    /// tasks that were running on `gone` count a worker death and are requeued.
    pub(super) fn adopt_running(
        &mut self,
        now: Now,
        eval: EvalId,
        gone: Option<SocketAddr>,
        out: &mut Vec<Action>,
    ) {
        let Some(rec) = self.evals.get_mut(&eval) else { return };
        let mut died = Vec::new();
        let running: Vec<(TaskId, SocketAddr)> =
            rec.running.iter().map(|(t, w)| (t.clone(), w.socket())).collect();
        let mut lost = Vec::new();
        for (task, addr) in running {
            match addr {
                // Published as running here, but no slot of this node runs it (it finished while
                // another node was responsible): hand it out again.
                addr if addr == self.cfg.me && Some(addr) != gone && !self.here.contains(&task) => {
                    lost.push(task)
                }
                addr if Some(addr) != gone => {
                    if !self.assignments.contains(&task) {
                        self.assignments.assign(rec, &task, addr, true, now.mono);
                    }
                }
                _ => died.push(task),
            }
        }
        for t in lost {
            self.release(eval, &t, out);
        }
        for t in died {
            self.task_killed_worker(now, eval, &t, out);
        }
    }

    /// Checks a result post from `caller` against what this node knows: only the worker the
    /// task is assigned to may deliver its result, and only to the node responsible for the
    /// evaluation. Returns the evaluation.
    fn check_post(
        &self,
        post: &TaskPost,
        caller: SocketAddr,
    ) -> Result<Result<(EvalId, TaskId), Accepted>, Refusal> {
        let caller_s = caller.to_string();
        if post.node() != caller_s {
            return Err(Refusal::Forbidden(format!(
                "the result names worker {} but was sent by {caller_s}",
                post.node()
            )));
        }
        if let Some(report) = &post.report {
            report.check_attempts().map_err(Refusal::BadRequest)?;
        }
        let task: TaskId = post.result.task_id.parse().map_err(|e| Refusal::BadRequest(format!("{e}")))?;
        if task.project().as_str() != post.result.project_id || task.module() != post.result.module {
            return Err(Refusal::BadRequest("task_id does not match project_id and module".into()));
        }
        let rec = match post.eval_id {
            Some(id) => self.evals.get(&id),
            None => self.project(task.project()).map(|(r, _)| r),
        };
        let rec = rec.ok_or_else(|| Refusal::NotFound("unknown evaluation".into()))?;
        if !rec.knows_task(&task) {
            return Err(Refusal::NotFound(format!("unknown task {task}")));
        }
        #[cfg(test)]
        if self.bug == Some(super::Bug::AcceptSecondResult) && rec.responsible == self.me() {
            return Ok(Ok((rec.id, task)));
        }
        if rec.results.contains_key(&task) || self.fence.is_pending(rec.id, &task) {
            return Ok(Err(Accepted::Duplicate));
        }
        if rec.responsible != self.me() {
            return Err(Refusal::Unavailable(format!(
                "this node is not responsible for evaluation {}: deliver the result to {}",
                rec.id, rec.responsible
            )));
        }
        if self.held.contains(&rec.id) || self.fence.in_phase1(rec.id) || !self.quorum() {
            return Err(Refusal::Unavailable(format!(
                "evaluation {} is being taken over or this node sees no majority: retry later",
                rec.id
            )));
        }
        // Handed out by this node now, or (after a restart, before the record's assignments
        // are adopted) published as running on the caller by the record.
        let assigned = self.assignments.get(&task).is_some_and(|a| a.worker == caller)
            || self.assignments.was_handed(&task, caller)
            || rec.running.get(&task).is_some_and(|w| *w == caller);
        if !assigned {
            return Err(Refusal::Forbidden(format!("task {task} is not assigned to {caller_s}")));
        }
        Ok(Ok((rec.id, task)))
    }

    /// Accepts a result post; the first accepted result of a task wins.
    pub(super) fn accept(
        &mut self,
        now: Now,
        post: TaskPost,
        caller: SocketAddr,
        out: &mut Vec<Action>,
    ) -> Result<Accepted, Refusal> {
        let (eval, task) = match self.check_post(&post, caller)? {
            Ok(checked) => checked,
            Err(answer) => return Ok(answer),
        };
        if let Some(error) = &post.error {
            let n = self.failures.entry(task.clone()).or_insert(0);
            *n += 1;
            let failures = *n;
            tracing::warn!(%task, worker = %post.node(), failures, "task failed to run: {error}");
            if failures < MAX_TASK_FAILURES {
                self.release(eval, &task, out);
                return Ok(Accepted::Requeued);
            }
        }
        let report = match (post.report, post.error) {
            (Some(r), _) => r,
            (None, Some(error)) => ModuleReport {
                module: post.result.module.clone(),
                tests: Vec::new(),
                duration: post.result.time,
                note: Some(format!("could not run after {MAX_TASK_FAILURES} attempts: {error}")),
                output: None,
                output_truncated: false,
            },
            (None, None) => return Err(Refusal::BadRequest("a result needs \"report\" or \"error\"".into())),
        };
        let result = ModuleResult {
            node: NodeAddr::from(caller),
            attempt: post.attempt,
            finished_at: now.wall,
            report,
        };
        self.assignments.finish(&task);
        self.failures.remove(&task);
        let stored = self.propose_result(now, eval, (&task, result), out);
        Ok(if stored { Accepted::Stored } else { Accepted::Duplicate })
    }

    /// Stores a task's result unless it has one; remembers the module's duration once all its
    /// tasks have results. Returns whether it was stored.
    pub(super) fn store_result(
        &mut self,
        now: Now,
        eval: EvalId,
        task: &TaskId,
        result: ModuleResult,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(rec) = self.evals.get_mut(&eval) else { return false };
        #[cfg(test)]
        if self.bug == Some(super::Bug::AcceptSecondResult) {
            rec.results.remove(task);
        }
        if !rec.add_result(task, result, now.wall) {
            return false;
        }
        tracing::info!(%task, "result stored");
        self.changed(eval, std::slice::from_ref(task), out);
        out.push(Action::PushCache);
        let Some(rec) = self.evals.get(&eval) else { return true };
        let Some(p) = rec.project(task.project()) else { return true };
        let module = task.module();
        let progress = rec.module_progress(p, module);
        if progress.finished() {
            let key = duration_key(&p.name, module);
            let stat = ModuleStat { secs: progress.duration(), tests: progress.counts().total() };
            self.durations.insert(key.clone(), stat);
            out.push(Action::RememberDuration { key, stat });
        }
        true
    }
}
