//! The responsible node's side of task distribution: the queue (longest first), local dispatch,
//! TASK_REQUEST/TASK_CONFIRM handling, requeueing, and accepting results.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdtester_runner_api::{Chunk, Limits, ModuleReport};

use super::worker::{self, TaskPost};
use super::{App, AppError, InFlight};
use crate::eval::{self, EvalId, ModuleResult, ProjectRecord, ProjectState};
use crate::wire::{self, Message, NodeIdData, TaskInfo, TaskSendData, TaskSourceKind};

/// Period of the scheduler when nothing wakes it.
const TICK: Duration = Duration::from_millis(100);
/// Failed attempts (runner infrastructure errors) before a task is recorded as not runnable.
const MAX_TASK_FAILURES: u32 = 3;

/// A task picked from the queue.
#[derive(Debug, Clone)]
pub struct Assigned {
    pub eval: EvalId,
    pub task_id: String,
    pub project: ProjectRecord,
    pub module: String,
    pub chunk: Option<Chunk>,
}

pub async fn run(app: Arc<App>) {
    loop {
        tokio::select! {
            _ = app.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        pass(&app);
    }
}

/// Lease of a confirmed task: twice the module time limit plus a minute for preparation.
fn lease(limits: &Limits) -> Duration {
    Duration::from_secs(limits.timeout_s.saturating_mul(2).saturating_add(60))
}

fn pass(app: &Arc<App>) {
    let now = Instant::now();
    let confirm_timeout = Duration::from_millis(app.cfg.timers.confirm_timeout_ms);
    let live: HashSet<SocketAddr> = app.members().iter().filter_map(|m| m.parse().ok()).collect();
    let mut expired = Vec::new();
    {
        let mut st = app.lock();
        st.inflight.retain(|t, f| {
            let keep = if f.worker == app.udp {
                true
            } else if !f.confirmed {
                now.duration_since(f.since) < confirm_timeout
            } else {
                now < f.deadline && live.contains(&f.worker)
            };
            if !keep {
                tracing::info!(task = %t, worker = %f.worker, confirmed = f.confirmed, "requeueing task");
                expired.push((t.clone(), f.eval));
            }
            keep
        });
    }
    for (t, e) in expired {
        clear_running(app, e, &t);
    }
    while let Ok(permit) = app.slots.clone().try_acquire_owned() {
        let Some(task) = take_next(app, app.udp) else { break };
        let app2 = app.clone();
        tokio::spawn(async move {
            worker::run_local(app2, task, permit).await;
        });
    }
    let announce = {
        let mut st = app.lock();
        let due = st.next_announce.is_none_or(|t| now >= t);
        if due && has_pending(app, &st) {
            st.next_announce = Some(now + Duration::from_millis(app.cfg.timers.task_announce_ms));
            true
        } else {
            false
        }
    };
    if announce
        && let Some(net) = app.net()
        && let Some(id) = net.snapshot().id
        && !net.snapshot().peers.is_empty()
    {
        net.broadcast(Message::TaskAnnounce(NodeIdData { id }));
    }
}

fn clear_running(app: &App, eval: EvalId, task: &str) {
    app.update(eval, |rec| {
        if rec.running.remove(task).is_some() {
            rec.version += 1;
        }
    });
}

/// Whether this node schedules `rec` now.
fn schedules(app: &App, st: &super::State, rec: &crate::eval::EvalRecord) -> bool {
    rec.responsible == app.udp_s && rec.end_time.is_none() && !st.held.contains(&rec.id)
}

fn has_pending(app: &App, st: &super::State) -> bool {
    st.evals.values().filter(|r| schedules(app, st, r)).any(|r| {
        r.all_tasks().any(|t| !r.results.contains_key(&t.task_id) && !st.inflight.contains_key(&t.task_id))
    })
}

/// Remembered (seconds, tests) of modules by duration key, through the state's cache.
pub fn remembered(app: &App, st: &mut super::State, keys: &[String]) -> Vec<Option<(f64, u64)>> {
    let missing: Vec<String> = keys.iter().filter(|k| !st.durations.contains_key(*k)).cloned().collect();
    if !missing.is_empty() {
        match app.store.durations(&missing) {
            Ok(found) => {
                for (k, d) in missing.into_iter().zip(found) {
                    st.durations.insert(k, d);
                }
            }
            Err(e) => tracing::warn!("reading remembered durations: {e}"),
        }
    }
    keys.iter().map(|k| st.durations.get(k).copied().flatten()).collect()
}

struct Candidate {
    est: f64,
    start: f64,
    task_id: String,
    eval: EvalId,
    project: ProjectRecord,
    module: String,
    chunk: Option<Chunk>,
}

/// Picks the next task (longest remembered duration first, a chunk counting its share; unknown
/// durations count as longest; then older evaluations first) and marks it handed to `worker`.
pub fn take_next(app: &App, worker: SocketAddr) -> Option<Assigned> {
    let mut st = app.lock();
    let mut candidates: Vec<Candidate> = Vec::new();
    for r in st.evals.values().filter(|r| schedules(app, &st, r)) {
        for t in r.all_tasks() {
            if !r.results.contains_key(&t.task_id) && !st.inflight.contains_key(&t.task_id) {
                candidates.push(Candidate {
                    est: 0.0,
                    start: r.start_time,
                    eval: r.id,
                    project: t.project.clone(),
                    module: t.module.to_string(),
                    chunk: t.chunk,
                    task_id: t.task_id,
                });
            }
        }
    }
    if candidates.is_empty() {
        return None;
    }
    let keys: Vec<String> = candidates.iter().map(|c| duration_key(&c.project.name, &c.module)).collect();
    let known = remembered(app, &mut st, &keys);
    for (c, k) in candidates.iter_mut().zip(known) {
        let share = c.chunk.map_or(1.0, |ch| f64::from(ch.count));
        c.est = k.map_or(f64::INFINITY, |(secs, _)| secs / share);
    }
    let best = candidates.into_iter().min_by(|a, b| {
        b.est.total_cmp(&a.est).then(a.start.total_cmp(&b.start)).then(a.task_id.cmp(&b.task_id))
    })?;
    let limits = match &best.project.state {
        ProjectState::Ready { limits, .. } => limits.clone(),
        _ => Limits::default(),
    };
    let now = Instant::now();
    let local = worker == app.udp;
    st.inflight.insert(
        best.task_id.clone(),
        InFlight { eval: best.eval, worker, confirmed: local, since: now, deadline: now + lease(&limits) },
    );
    drop(st);
    if local {
        let me = app.udp_s.clone();
        let t = best.task_id.clone();
        app.update(best.eval, move |rec| {
            rec.running.insert(t, me);
            rec.version += 1;
        });
    }
    Some(Assigned {
        eval: best.eval,
        task_id: best.task_id,
        project: best.project,
        module: best.module,
        chunk: best.chunk,
    })
}

/// Key of the durations table.
pub fn duration_key(project_name: &str, module: &str) -> String {
    format!("{project_name}::{module}")
}

/// TASK_REQUEST from an idle worker: hand it the next task.
pub fn on_request(app: &Arc<App>, from: SocketAddr) {
    if from == app.udp {
        return;
    }
    let Some(net) = app.net() else { return };
    let Some(id) = net.snapshot().id else { return };
    let Some(task) = take_next(app, from) else { return };
    tracing::debug!(task = %task.task_id, worker = %from, "TASK_SEND");
    net.send(
        from,
        Message::TaskSend(TaskSendData {
            id,
            info: TaskInfo {
                project_id: task.project.id.clone(),
                module: eval::task_part(&task.module, task.chunk),
                project_name: task.project.name.clone(),
                api_port: app.http.port().to_string(),
                eval_id: Some(task.eval.to_string()),
                url: None,
                token: None,
                kind: TaskSourceKind::Zip,
            },
        }),
    );
}

/// TASK_CONFIRM: the worker runs the task now.
pub fn on_confirm(app: &Arc<App>, from: SocketAddr, task_id: &str) {
    let eval = {
        let mut st = app.lock();
        match st.inflight.get_mut(task_id) {
            Some(f) if f.worker == from && !f.confirmed => {
                f.confirmed = true;
                Some(f.eval)
            }
            _ => None,
        }
    };
    let Some(eval) = eval else {
        tracing::debug!(task = %task_id, worker = %from, "late or unknown TASK_CONFIRM ignored");
        return;
    };
    let worker = wire::addr_string(from);
    let t = task_id.to_string();
    app.update(eval, move |rec| {
        rec.running.insert(t, worker);
        rec.version += 1;
    });
}

/// Requeues every task handed to `worker` (it failed or left). When it `died`, the tasks it had
/// confirmed count a worker death each (see [`task_killed_worker`]).
pub fn requeue_worker(app: &Arc<App>, worker: SocketAddr, died: bool) {
    let gone: Vec<(String, InFlight)> = {
        let mut st = app.lock();
        let ids: Vec<String> =
            st.inflight.iter().filter(|(_, f)| f.worker == worker).map(|(t, _)| t.clone()).collect();
        ids.into_iter().filter_map(|t| st.inflight.remove(&t).map(|f| (t, f))).collect()
    };
    for (t, f) in gone {
        clear_running(app, f.eval, &t);
        if died && f.confirmed {
            task_killed_worker(app, f.eval, &t);
        }
    }
    app.wake.notify_one();
}

/// The worker running `task_id` died (SIGKILL, a crash, its node restarted). A task that does
/// this [`eval::MAX_WORKER_DEATHS`] times is recorded as crashed and never handed out again, so
/// that one submission cannot take down node after node.
pub fn task_killed_worker(app: &Arc<App>, eval: EvalId, task_id: &str) {
    let Some(deaths) = app.update(eval, |rec| {
        if rec.results.contains_key(task_id) || !rec.knows_task(task_id) {
            return 0;
        }
        rec.running.remove(task_id);
        rec.worker_died(task_id)
    }) else {
        return;
    };
    if deaths < eval::MAX_WORKER_DEATHS {
        if deaths > 0 {
            tracing::warn!(eval, task = %task_id, deaths, "the worker running this task died; requeued");
        }
        return;
    }
    let module = eval::split_task_id(task_id).map_or(task_id, |(_, part)| eval::parse_task_part(part).0);
    tracing::error!(eval, task = %task_id, "task killed its worker {deaths} times: recorded as crashed");
    let report = ModuleReport {
        module: module.to_string(),
        tests: Vec::new(),
        duration: 0.0,
        note: Some(format!(
            "crashed: killed its worker {deaths} times (the node running it died); not run again"
        )),
        output: None,
        output_truncated: false,
    };
    let result = ModuleResult {
        node: app.udp_s.clone(),
        attempt: format!("worker-deaths-{deaths}"),
        finished_at: eval::now_secs(),
        report,
    };
    app.lock().inflight.remove(task_id);
    app.add_result(eval, task_id, result);
}

/// Takes the tasks a record lists as running on live workers other than `gone` into this
/// node's in-flight table (after a takeover or a restart), so that their workers' results are
/// accepted; tasks that were running on `gone` count a worker death and are requeued.
pub fn adopt_running(app: &Arc<App>, eval: EvalId, gone: SocketAddr) {
    let Some(rec) = app.record(eval) else { return };
    let gone_s = wire::addr_string(gone);
    let now = Instant::now();
    let mut died = Vec::new();
    {
        let mut st = app.lock();
        for (task, worker) in &rec.running {
            let Some(addr) = worker.parse::<SocketAddr>().ok().filter(|_| *worker != gone_s) else {
                died.push(task.clone());
                continue;
            };
            let limits = eval::split_task_id(task)
                .and_then(|(pid, _)| rec.project(pid))
                .and_then(|p| match &p.state {
                    ProjectState::Ready { limits, .. } => Some(limits.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            st.inflight.entry(task.clone()).or_insert(InFlight {
                eval,
                worker: addr,
                confirmed: true,
                since: now,
                deadline: now + lease(&limits),
            });
        }
    }
    for t in died {
        task_killed_worker(app, eval, &t);
    }
    app.wake.notify_one();
}

/// Outcome of a result post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Stored,
    Duplicate,
    Requeued,
}

impl Accepted {
    pub fn as_str(self) -> &'static str {
        match self {
            Accepted::Stored => "success",
            Accepted::Duplicate => "duplicate",
            Accepted::Requeued => "requeued",
        }
    }
}

/// Accepts a module's result (`POST /task`) sent by `caller` (authenticated by the HTTP layer,
/// or this node itself). Only the worker the task is handed to may deliver its result, and only
/// to the node responsible for the evaluation; the first accepted result wins.
pub async fn accept(app: &Arc<App>, post: TaskPost, caller: SocketAddr) -> Result<Accepted, AppError> {
    if post.node() != wire::addr_string(caller) {
        return Err(AppError::Forbidden(format!(
            "the result names worker {} but was sent by {}",
            post.node(),
            wire::addr_string(caller)
        )));
    }
    let (pid, part) = eval::split_task_id(&post.result.task_id).ok_or_else(|| {
        AppError::BadRequest(format!("task_id {:?} is not <project_id>::<module>", post.result.task_id))
    })?;
    let module = eval::parse_task_part(part).0;
    if pid != post.result.project_id || module != post.result.module {
        return Err(AppError::BadRequest("task_id does not match project_id and module".into()));
    }
    let rec = {
        let st = app.lock();
        match post.eval_id {
            Some(id) => st.evals.get(&id).cloned(),
            None => st.evals.values().find(|r| r.project(pid).is_some()).cloned(),
        }
    };
    let Some(rec) = rec else { return Err(AppError::NotFound("unknown evaluation".into())) };
    if !rec.knows_task(&post.result.task_id) {
        return Err(AppError::NotFound(format!("unknown task {}", post.result.task_id)));
    }
    if rec.results.contains_key(&post.result.task_id) {
        return Ok(Accepted::Duplicate);
    }
    if rec.responsible != app.udp_s {
        return Err(AppError::Unavailable(format!(
            "this node is not responsible for evaluation {}: deliver the result to {}",
            rec.id, rec.responsible
        )));
    }
    // Handed out by this node now, or (after a restart, before the record's assignments are
    // adopted) published as running on the caller by the record.
    let caller_s = wire::addr_string(caller);
    let assigned = match app.lock().inflight.get(&post.result.task_id) {
        Some(f) => f.worker == caller,
        None => rec.running.get(&post.result.task_id).is_some_and(|w| *w == caller_s),
    };
    if !assigned {
        return Err(AppError::Forbidden(format!(
            "task {} is not assigned to {}",
            post.result.task_id,
            wire::addr_string(caller)
        )));
    }
    if let Some(error) = &post.error {
        let failures = {
            let mut st = app.lock();
            st.inflight.remove(&post.result.task_id);
            let n = st.task_failures.entry(post.result.task_id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        tracing::warn!(task = %post.result.task_id, worker = %post.node(), failures, "task failed to run: {error}");
        if failures < MAX_TASK_FAILURES {
            clear_running(app, rec.id, &post.result.task_id);
            return Ok(Accepted::Requeued);
        }
    }
    let report = match (&post.report, &post.error) {
        (Some(r), _) => r.clone(),
        (None, Some(error)) => ModuleReport {
            module: post.result.module.clone(),
            tests: Vec::new(),
            duration: post.result.time,
            note: Some(format!("could not run after {MAX_TASK_FAILURES} attempts: {error}")),
            output: None,
            output_truncated: false,
        },
        (None, None) => return Err(AppError::BadRequest("a result needs \"report\" or \"error\"".into())),
    };
    let result = ModuleResult {
        node: post.node(),
        attempt: post.attempt.clone(),
        finished_at: eval::now_secs(),
        report: report.clone(),
    };
    let stored = app.add_result(rec.id, &post.result.task_id, result);
    {
        let mut st = app.lock();
        st.inflight.remove(&post.result.task_id);
        st.task_failures.remove(&post.result.task_id);
    }
    if stored {
        remember_duration(app, rec.id, pid, module);
        tracing::info!(task = %post.result.task_id, worker = %post.node(), tests = report.tests.len(), "result stored");
        if let Some(net) = app.net() {
            net.push_cache();
        }
    }
    app.wake.notify_one();
    Ok(if stored { Accepted::Stored } else { Accepted::Duplicate })
}

/// Once every task of a module has a result, remembers how long it took and how many tests it
/// has (chunks summed), for longest-first scheduling and chunk planning.
fn remember_duration(app: &App, eval: EvalId, pid: &str, module: &str) {
    let Some(rec) = app.record(eval) else { return };
    let Some(p) = rec.project(pid) else { return };
    let progress = rec.module_progress(p, module);
    if !progress.finished() {
        return;
    }
    let (secs, tests) = (progress.duration(), progress.counts().total());
    let key = duration_key(&p.name, module);
    if let Err(e) = app.store.record_durations(&[(key.clone(), secs, tests)]) {
        tracing::warn!("remembering the module duration: {e}");
    }
    app.lock().durations.insert(key, Some((secs, tests)));
}
