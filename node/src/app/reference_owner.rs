//! Owning the evaluations of a failed reference node (`research/reference.md` §3.6): when this
//! node wins the election for a failed node (the core's rule, the reference's too: the smallest
//! live id), it becomes responsible for the projects of that node's unfinished reference
//! evaluations, as the reference's recovery node does:
//!
//! - it sets itself as their `node`, sends EVALUATION_RESPONSIBILITY_UPDATE per project to every
//!   peer and queues every module without a result in its view (the reference's CACHE_UPDATEs:
//!   module names, project names, evaluation membership); a project whose modules the dead
//!   owner never published is discovered again from its files (pytest modules under `tests/`,
//!   by file name), and its evaluation does not end before;
//! - it runs queued modules in its reference slots with the project fetched from whichever live
//!   node serves `/file/<project_id>` (fetched already when the dead owner announced it), and
//!   hands them to reference workers on their TASK_REQUEST (TASK_ANNOUNCE every 3 s while
//!   modules wait; TASK_SEND with this node's `api_port`), requeueing a task not confirmed within
//!   5 s or without result 40 s after its confirmation, or whose worker failed;
//! - it accepts a result only from the worker it handed that task to (or its own run), the first
//!   per module, sets the evaluation's end time when every module has one, and publishes the
//!   evaluations in its CACHE_UPDATEs (which reference nodes merge: finished modules and the end
//!   time win), so `/evaluation/<id>` and `/stats` show them finished on every node.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::App;
use super::reference::{RefState, fetch_project};
use crate::engine::TaskPost;
use crate::eval::ProjectRecord;
use crate::interop;
use crate::wire::{
    self, EvalMap, Message, NodeIdData, ResponsibilityUpdateData, TaskInfo, TaskSendData, TaskSourceKind,
};

/// How long a task handed to a reference worker waits for TASK_CONFIRM (the reference's
/// response timeout on loopback).
const CONFIRM_WAIT: Duration = Duration::from_secs(5);
/// How long a confirmed task waits for its result (the reference's TASK_TIMEOUT).
const RESULT_WAIT: Duration = Duration::from_secs(40);
/// TASK_ANNOUNCE period while modules wait (the reference's TASK_ANNOUNCE_INTERVAL).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(3);

/// A task of an owned reference project that is running.
struct Flight {
    project: String,
    module: String,
    /// The reference worker it was handed to; `None`: one of this node's slots runs it.
    worker: Option<SocketAddr>,
    at: Instant,
    confirmed: bool,
}

/// The modules of owned reference projects: waiting, and running.
#[derive(Default)]
pub(super) struct Owned {
    queue: VecDeque<(String, String)>,
    /// By the reference's task id (`<project_id>::<module>`).
    flight: HashMap<String, Flight>,
    announced: Option<Instant>,
    /// Owned projects whose modules are being discovered again.
    discovering: HashSet<String>,
}

/// The next owned task to start: (project, module, project name, evaluation).
type Next = (String, String, String, String);

impl RefState {
    /// Ends the evaluations whose owned modules all have results (none being discovered).
    fn finish_owned(&mut self, me: &str) -> bool {
        let discovering = &self.owned.discovering;
        self.view.finish(me, crate::eval::now_secs(), |p| discovering.contains(p))
    }

    /// Queues a module of an owned project unless it waits or runs already.
    fn enqueue(&mut self, project: &str, module: String) {
        let task = interop::task_id(project, &module);
        let owned = &mut self.owned;
        if !owned.flight.contains_key(&task) && !owned.queue.iter().any(|(p, m)| p == project && *m == module)
        {
            owned.queue.push_back((project.to_string(), module));
        }
    }

    /// Takes the next queued module that `me` still owns and has no result, recording it as
    /// running on `worker` (`None`: here).
    fn start_next(&mut self, me: &str, worker: Option<SocketAddr>) -> Option<Next> {
        while let Some((project, module)) = self.owned.queue.pop_front() {
            let task = interop::task_id(&project, &module);
            if self.owned.flight.contains_key(&task) {
                continue;
            }
            let Some((name, eval)) = self.view.owned_task(me, &project, &module) else { continue };
            if worker.is_none() {
                self.view.running(me, &project, &module);
            }
            let flight = Flight {
                project: project.clone(),
                module: module.clone(),
                worker,
                at: Instant::now(),
                confirmed: false,
            };
            self.owned.flight.insert(task, flight);
            return Some((project, module, name, eval));
        }
        None
    }

    /// Puts back the hand-outs whose worker did not confirm in time, did not report in time,
    /// or is no longer a member.
    fn requeue_expired(&mut self, members: &[String]) {
        let expired: Vec<String> = self
            .owned
            .flight
            .iter()
            .filter(|(_, f)| {
                f.worker.is_some_and(|w| {
                    let wait = if f.confirmed { RESULT_WAIT } else { CONFIRM_WAIT };
                    f.at.elapsed() > wait || !members.contains(&w.to_string())
                })
            })
            .map(|(t, _)| t.clone())
            .collect();
        for task in expired {
            if let Some(f) = self.owned.flight.remove(&task) {
                tracing::info!(%task, worker = ?f.worker, "reference task not finished in time: requeued");
                self.owned.queue.push_front((f.project, f.module));
            }
        }
    }
}

impl App {
    /// This node won the election for `failed`: it owns the failed node's unfinished reference
    /// projects (those its view says `failed` owned, and those the election `named` whose owner
    /// is not a live member).
    pub(super) fn take_over_reference(self: &Arc<Self>, failed: SocketAddr, named: &EvalMap) {
        let me = self.addr().to_string();
        let mut lost = Vec::new();
        let members = self.members();
        let taken = {
            let mut st = self.ref_state();
            let live = |node: &str| members.iter().any(|m| m == node);
            let taken = st.view.take_over(&wire::addr_string(failed), &me, named, live);
            for pid in &taken {
                if let Some(name) = st.view.undiscovered(&me, pid) {
                    st.owned.discovering.insert(pid.clone());
                    lost.push((pid.clone(), name));
                }
                for module in st.view.unfinished(pid) {
                    st.enqueue(pid, module);
                }
            }
            taken
        };
        for (pid, name) in lost {
            tokio::spawn(discover_owned(self.clone(), pid, name));
        }
        if taken.is_empty() {
            return;
        }
        tracing::info!(%failed, projects = taken.len(), "taking over a reference node's evaluations");
        if let Some(net) = self.net() {
            for pid in &taken {
                let update = ResponsibilityUpdateData { project_id: pid.clone(), new_node: me.clone() };
                net.broadcast(Message::EvaluationResponsibilityUpdate(update));
            }
        }
        self.ref_state().finish_owned(&me);
        self.push_cache();
        self.run_owned();
    }

    /// Every second: requeues late hand-outs, starts queued modules in free reference slots,
    /// ends finished evaluations and announces the remaining work to reference peers.
    pub(super) fn reference_owner_tick(self: &Arc<Self>) {
        let (me, members) = (self.addr().to_string(), self.members());
        self.ref_state().requeue_expired(&members);
        self.run_owned();
        let announce = {
            let mut st = self.ref_state();
            let due = !st.owned.queue.is_empty()
                && st.owned.announced.is_none_or(|a| a.elapsed() >= ANNOUNCE_EVERY);
            if due {
                st.owned.announced = Some(Instant::now());
            }
            due
        };
        if self.ref_state().finish_owned(&me) {
            self.push_cache();
        }
        let Some(net) = self.net().filter(|_| announce) else { return };
        let snap = net.snapshot();
        let Some(id) = snap.id else { return };
        let reference_peers = snap.peers.values().filter(|a| !snap.http.contains_key(*a));
        for peer in reference_peers.filter_map(|a| a.parse().ok()) {
            net.send(peer, Message::TaskAnnounce(NodeIdData { id: id.clone() }));
        }
    }

    /// Starts queued owned modules while reference slots are free.
    fn run_owned(self: &Arc<Self>) {
        let me = self.addr().to_string();
        let slots = self.cfg.runner.workers.max(1);
        loop {
            let next = {
                let mut st = self.ref_state();
                if st.running >= slots {
                    return;
                }
                let Some(next) = st.start_next(&me, None) else { return };
                st.running += 1;
                next
            };
            tokio::spawn(run_owned_task(self.clone(), next));
        }
    }

    /// TASK_REQUEST of a reference worker while owned modules wait: the next one is sent in the
    /// reference's terms; whether one was.
    pub(super) fn hand_owned(self: &Arc<Self>, worker: SocketAddr) -> bool {
        let Some(net) = self.net() else { return false };
        let Some(id) = net.snapshot().id else { return false };
        let me = self.addr().to_string();
        let (project_id, module, project_name, eval) = {
            let mut st = self.ref_state();
            let Some(next) = st.start_next(&me, Some(worker)) else { return false };
            let task = interop::task_id(&next.0, &next.1);
            st.hand((worker, task.clone()), task);
            next
        };
        tracing::info!(%worker, project = %project_id, %module, "owned reference task handed out");
        let info = TaskInfo {
            project_id,
            module,
            project_name,
            api_port: self.http.port().to_string(),
            eval_id: Some(eval),
            url: None,
            token: None,
            kind: TaskSourceKind::Zip,
        };
        net.send(worker, Message::TaskSend(TaskSendData { id, info }));
        true
    }

    /// TASK_CONFIRM of a reference worker for an owned task handed to it; whether it was one.
    pub(super) fn confirm_owned(&self, worker: SocketAddr, task: &str) -> bool {
        let me = self.addr().to_string();
        let mut st = self.ref_state();
        let st = &mut *st;
        let Some(f) = st.owned.flight.get_mut(task).filter(|f| f.worker == Some(worker)) else {
            return false;
        };
        f.confirmed = true;
        f.at = Instant::now();
        st.view.running(&me, &f.project, &f.module);
        true
    }

    /// A reference worker's `POST /task` for an owned task handed to it: stored when its module
    /// has no result yet. `None` when the post is not one (it goes to the engine).
    pub(super) fn owned_result(
        self: &Arc<Self>,
        post: &TaskPost,
        caller: SocketAddr,
    ) -> Option<&'static str> {
        let r = &post.result;
        let key = (caller, r.task_id.clone());
        if r.task_id != interop::task_id(&r.project_id, &r.module) || !self.ref_state().handed_itself(&key) {
            return None;
        }
        self.ref_state().finished(&key);
        self.ref_state().owned.flight.remove(&r.task_id);
        let stored = self.record_owned(&r.project_id, &r.module, r.passed, r.failed, r.time);
        Some(if stored { "success" } else { "duplicate" })
    }

    /// Stores a module result of an owned project (the first wins) and publishes it; whether it
    /// was stored.
    pub(super) fn record_owned(
        &self,
        project: &str,
        module: &str,
        passed: u64,
        failed: u64,
        time: f64,
    ) -> bool {
        let me = self.addr().to_string();
        let stored = {
            let mut st = self.ref_state();
            let stored = st.view.record(&me, project, module, passed, failed, time);
            st.finish_owned(&me);
            stored
        };
        if stored {
            tracing::info!(project, module, passed, failed, "owned reference module finished");
            self.push_cache();
        }
        stored
    }
}

/// Runs an owned module in this node's reference slot and stores its result. Without the
/// project (no live node serves it yet) the module goes back to the queue; a module that
/// cannot run stays running, as on the reference (which never retries such a module).
async fn run_owned_task(app: Arc<App>, (project_id, module, name, _): Next) {
    let task = interop::task_id(&project_id, &module);
    let outcome = match fetch_anywhere(&app, &project_id, &name).await {
        Ok(project) => Some(app.run_reference(&project, &module, &task).await),
        Err(e) => {
            tracing::warn!(%task, "no live node serves the reference project yet: {}", app.redact(&e));
            None
        }
    };
    {
        let mut st = app.ref_state();
        st.running = st.running.saturating_sub(1);
        st.owned.flight.remove(&task);
        if outcome.is_none() {
            st.owned.queue.push_back((project_id.clone(), module.clone()));
        }
    }
    match outcome {
        Some(Ok(report)) => {
            let c = report.counts();
            app.record_owned(&project_id, &module, c.passes(), c.failures(), report.duration);
        }
        Some(Err(e)) => tracing::warn!(%task, "owned reference module could not run: {}", app.redact(&e)),
        None => {}
    }
}

/// Discovers the modules of an owned project that its dead owner never published, as the
/// reference's recovery node does from its copy: pytest modules under `tests/`, by file name
/// (the reference's module names), queued as pending.
async fn discover_owned(app: Arc<App>, project_id: String, name: String) {
    let found = match fetch_anywhere(&app, &project_id, &name).await {
        Ok(project) => app.discover(&project).await,
        Err(e) => Err(e),
    };
    let mut modules: Vec<String> = match found {
        Ok(d) => d
            .modules
            .iter()
            .filter_map(|m| m.strip_prefix("tests/"))
            .filter_map(|m| m.rsplit('/').next())
            .map(String::from)
            .collect(),
        Err(e) => {
            tracing::warn!(project = %project_id, "discovering a taken-over reference project failed: {}", app.redact(&e));
            Vec::new()
        }
    };
    modules.sort();
    modules.dedup();
    let me = app.addr().to_string();
    {
        let mut st = app.ref_state();
        st.owned.discovering.remove(&project_id);
        st.view.discovered(&me, &project_id, &modules);
        for module in st.view.unfinished(&project_id) {
            st.enqueue(&project_id, module);
        }
    }
    tracing::info!(project = %project_id, modules = modules.len(), "taken-over reference project discovered");
    app.run_owned();
}

/// A reference project from this node's store, or fetched (`GET /file/<project_id>`, the
/// reference's layout) from the first live peer whose HTTP API serves it.
async fn fetch_anywhere(app: &Arc<App>, project_id: &str, name: &str) -> Result<ProjectRecord, String> {
    if let Some(p) = app.ref_state().fetched(project_id) {
        return Ok(p);
    }
    let peers: Vec<SocketAddr> = app
        .net()
        .map(|n| n.snapshot().peers.into_values().filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default();
    let mut last = "no live peer's HTTP API is known".to_string();
    for http in peers.into_iter().filter_map(|p| app.http_of(p)) {
        match fetch_project(app.clone(), http, project_id.to_string(), name.to_string()).await {
            Ok(p) => return Ok(p),
            Err(e) => last = format!("{http}: {e}"),
        }
    }
    Err(last)
}
