//! The evaluation engine: a sans-IO state machine that owns every evaluation a node knows and
//! decides who runs which task, like the protocol [`crate::core`] does for membership.
//!
//! `Engine::handle(now, input) -> Vec<Action>` is the only way in. Inputs are what happened
//! (a submission, a discovery's outcome, a peer's message, a worker's result, a peer's failure,
//! a takeover, replicated records, a tick); actions are what the shell must do (persist a record,
//! discover a project, run a task on a local slot, send a message, deliver a result, answer a
//! post). The engine reads no clock, touches no file or socket and takes no lock: the node
//! ([`crate::app`]) and the deterministic whole-system simulator (`engine::sim`, tests) are its
//! shells. A `cdtester run` shell drives the same engine with one member and no peers.
//!
//! # Scheduling
//! The responsible node of an evaluation keeps its unfinished tasks (longest remembered duration
//! first) and hands them to its own free slots at once (an [`Action::Run`], no round trip) and to
//! peers by the pull protocol (TASK_ANNOUNCE -> TASK_REQUEST -> TASK_SEND -> TASK_CONFIRM). A
//! freed slot takes the next task in the same `handle` call. Who runs which task lives in one
//! table ([`sched::Assignments`]) that also publishes it in the replicated record's `running`.
//!
//! # Results
//! A result is accepted only from the worker the task is assigned to, only by the node
//! responsible for the evaluation, and only once (the first result wins); a result of a local
//! task is accepted in place, remote ones go back in batches ([`Action::DeliverBatch`]).

mod outbox;
mod post;
mod quorum;
mod replica;
mod sched;
#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cdtester_runner_api::Limits;
use cdtester_runner_api::plan::ModuleStat;

use crate::eval::{EvalRecord, ProjectRecord, ProjectState};
use crate::ids::{EvalId, NodeAddr, ProjectId, TaskId};
use crate::wire::{Message, NodeId};

pub use outbox::{BatchAnswer, MAX_BATCH};
pub use post::{Accepted, Refusal, TaskAnswer, TaskPost};
pub use quorum::{Held, Vote};
pub use replica::{SyncRequest, SyncResponse, fingerprint};

/// The current time, as the shell reads it: monotonic for timers, wall seconds for records.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    /// Seconds since the Unix epoch.
    pub wall: f64,
}

/// What an engine is told at start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node's UDP address (its identity in records).
    pub me: SocketAddr,
    /// This node's HTTP port (announced in TASK_SEND).
    pub http_port: u16,
    /// Tasks this node runs at once.
    pub slots: usize,
    /// How long a handed-out task waits for its TASK_CONFIRM.
    pub confirm_timeout: Duration,
    /// Period of TASK_ANNOUNCE while tasks wait.
    pub announce_every: Duration,
    /// After a restart, how long evaluations this node was responsible for wait before it
    /// schedules them again (a takeover that happened meanwhile is learnt from peers first).
    pub hold: Duration,
    /// No cluster secret: a peer may only replicate the records it owns or submitted.
    pub open: bool,
    /// How long a failed member still counts for the majority (`timers.quorum_hold_ms`).
    pub quorum_hold: Duration,
}

/// What a project's discovery found (the runner's modules under this node's decision).
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    pub modules: Vec<String>,
    pub runner: String,
    pub limits: Limits,
    pub policies: Vec<String>,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum Input {
    /// A new evaluation accepted by this node (its records' `responsible` is this node).
    Submitted(EvalRecord),
    /// The discovery of a project finished (`Err`: why the project cannot be evaluated).
    Discovered { eval: EvalId, project: ProjectId, outcome: Result<Discovery, String> },
    /// The membership as the protocol core sees it now: this node's id and the live peers.
    Members { id: Option<NodeId>, peers: Vec<SocketAddr> },
    /// The peers that take part in majority commits ([`quorum`]): cdtester nodes, not
    /// reference-implementation ones, which never vote. Until given, every peer votes.
    Voters(Vec<SocketAddr>),
    /// Time passed.
    Tick,
    /// A task-distribution message from a peer.
    Message { from: SocketAddr, msg: Message },
    /// A result post from `caller` (authenticated by the shell, or this node itself).
    Result { post: TaskPost, caller: SocketAddr },
    /// A task this node ran (on one of its slots) finished; the slot is free. `from` handed it
    /// out (`None`: this node).
    Ran { post: TaskPost, from: Option<SocketAddr> },
    /// A module that ran in the session of a task on this node's own slot (one of its
    /// [`Task::with`]); reported before that task's own [`Input::Ran`], which frees the slot.
    RanAlong { post: TaskPost },
    /// A peer failed (`died`) or left.
    PeerDown { addr: SocketAddr, died: bool },
    /// A peer is live: new, back after a false suspicion (same id), or restarted (a new id at
    /// its address: the tasks it ran died with its previous process).
    PeerUp { id: NodeId, addr: SocketAddr },
    /// This node now owns the failed node's evaluations.
    TakeOver { failed: SocketAddr },
    /// Records (whole or deltas) replicated by member `from`, not yet validated.
    Merge { records: Vec<EvalRecord>, from: SocketAddr },
    /// Hand out the changes made since the last flush, for replication.
    Flush,
    /// A proposal (a record delta at the sender's term: provisional results, or none in the
    /// first phase of a takeover) from member `from`; answered by [`Action::Vote`].
    Propose { copy: EvalRecord, from: SocketAddr },
    /// Member `from` answered this node's proposal.
    Voted { vote: Vote, from: SocketAddr },
    /// The receiver of an [`Action::DeliverBatch`] answered.
    Delivered(Vec<BatchAnswer>),
}

/// A task to run on one of this node's slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub eval: EvalId,
    pub task_id: TaskId,
    /// The project, when this node holds it ready (a remote task's record may still be coming).
    pub project: Option<ProjectRecord>,
    /// The node that handed it out, when not this one.
    pub from: Option<SocketAddr>,
    /// Other whole modules of the same project run in the same session on the same slot
    /// (see [`sched`]'s grouping): each reports an [`Input::RanAlong`].
    pub with: Vec<TaskId>,
}

/// What the shell must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Write a record's header and the results it carries (a delta holds only new ones).
    Persist(EvalRecord),
    /// Discover a project's modules on this node, then report [`Input::Discovered`].
    Discover { eval: EvalId, project: ProjectRecord },
    /// Run a task on a slot, then report [`Input::Ran`].
    Run(Task),
    /// Send a message to a peer.
    Send { to: SocketAddr, msg: Message },
    /// Send a message to every live peer.
    Broadcast(Message),
    /// Deliver results to node `to` (the node responsible for their evaluations, or the one
    /// that handed the tasks out while none is known) in one request, and report its answers as
    /// [`Input::Delivered`]. Unanswered results are sent again later.
    DeliverBatch { to: SocketAddr, posts: Vec<TaskPost> },
    /// The answer to an [`Input::Result`].
    Answer(Result<Accepted, Refusal>),
    /// The evaluation summary changed: send a CACHE_UPDATE now.
    PushCache,
    /// Make sure this node has the project's archive (downloading it from `from` or the
    /// project's nodes when it is missing).
    Prefetch { project: ProjectRecord, from: SocketAddr },
    /// Remember how long a module took and how many tests it has.
    RememberDuration { key: String, stat: ModuleStat },
    /// Changed records to push to every member.
    Replicate(Vec<EvalRecord>),
    /// How many of the records of an [`Input::Merge`] changed this node's copy.
    Merged(usize),
    /// The members this node counts for majorities changed: keep them, and give them back to
    /// [`Engine::new`] after a restart (until it sees them again, a restarted node counts them
    /// as failed members, so that alone it is no majority).
    RememberMembers(Vec<SocketAddr>),
    /// Send a proposal to member `to` and report its answer as [`Input::Voted`].
    Propose { to: SocketAddr, copy: EvalRecord },
    /// The answer to an [`Input::Propose`].
    Vote(Vote),
}

/// Where a finished task's result goes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The task has a result already: nothing to deliver.
    Done,
    /// This node is responsible: accept it here.
    Here,
    /// Post it to this node.
    To(SocketAddr),
    /// No responsible node known (yet).
    Unknown,
}

/// Why a project without test modules cannot be evaluated.
pub const NO_TESTS: &str = "no test modules found (pytest collects nothing)";

/// Key of the duration memory: `"<project name>::<module>"`.
pub fn duration_key(project_name: &str, module: &str) -> String {
    format!("{project_name}::{module}")
}

/// A bug the simulator injects on purpose, to show that its invariants catch it.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Results are accepted from anyone for tasks that have one already, replacing it.
    AcceptSecondResult,
}

/// The evaluation state of one node.
pub struct Engine {
    #[cfg(test)]
    bug: Option<Bug>,
    cfg: EngineConfig,
    evals: BTreeMap<EvalId, EvalRecord>,
    assignments: sched::Assignments,
    /// Runner failures per task (requeued until [`sched::MAX_TASK_FAILURES`]).
    failures: HashMap<TaskId, u32>,
    /// Evaluations this node was responsible for before a restart, held until `resume_at`.
    held: BTreeSet<EvalId>,
    resume_at: Option<Instant>,
    /// Remembered module durations by [`duration_key`].
    durations: HashMap<String, ModuleStat>,
    /// Records changed here and not yet replicated, with the results added since.
    dirty: BTreeMap<EvalId, BTreeSet<TaskId>>,
    /// Projects whose discovery runs on this node.
    discovering: HashSet<ProjectId>,
    id: Option<NodeId>,
    peers: BTreeSet<SocketAddr>,
    /// Slots running a task.
    busy: usize,
    /// Tasks running on this node's slots now.
    here: BTreeSet<TaskId>,
    next_announce: Option<Instant>,
    /// Nodes that announced work, and when (a freed slot asks them again at once).
    announcers: BTreeMap<SocketAddr, Instant>,
    /// The node id last seen live at each peer address.
    incarnations: BTreeMap<SocketAddr, NodeId>,
    /// Majority commits and takeover phases ([`quorum`]).
    fence: quorum::Fence,
    /// Finished results waiting for delivery ([`outbox`]).
    outbox: outbox::Outbox,
}

impl Engine {
    /// An engine over stored `records`, remembered `durations` and the `members` it last
    /// counted for majorities ([`Action::RememberMembers`]), started at `now`.
    pub fn new(
        cfg: EngineConfig,
        records: Vec<EvalRecord>,
        durations: HashMap<String, ModuleStat>,
        members: Vec<SocketAddr>,
        now: Instant,
    ) -> Engine {
        let me = cfg.me;
        let evals: BTreeMap<EvalId, EvalRecord> = records.into_iter().map(|r| (r.id, r)).collect();
        let held: BTreeSet<EvalId> =
            evals.values().filter(|r| r.responsible == me && r.end_time.is_none()).map(|r| r.id).collect();
        let resume_at = (!held.is_empty()).then(|| now + cfg.hold);
        Engine {
            #[cfg(test)]
            bug: None,
            cfg,
            evals,
            assignments: sched::Assignments::default(),
            failures: HashMap::new(),
            held,
            resume_at,
            durations,
            dirty: BTreeMap::new(),
            discovering: HashSet::new(),
            id: None,
            peers: BTreeSet::new(),
            busy: 0,
            here: BTreeSet::new(),
            next_announce: None,
            announcers: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            fence: quorum::Fence::restored(members.into_iter().filter(|m| *m != me), now),
            outbox: outbox::Outbox::new(),
        }
    }

    /// Handles one input; returns what the shell must do, in order.
    pub fn handle(&mut self, now: Now, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Submitted(rec) => self.submitted(rec, &mut out),
            Input::Discovered { eval, project, outcome } => {
                self.discovered(now, eval, &project, outcome, &mut out)
            }
            Input::Members { id, peers } => {
                self.id = id;
                self.peers = peers.into_iter().filter(|p| *p != self.cfg.me).collect();
                self.fence_members(now.mono, None);
            }
            Input::Voters(voters) => self.fence_members(now.mono, Some(voters)),
            Input::Tick => {
                self.fence_members(now.mono, None);
                self.expire(now, &mut out);
            }
            Input::Message { from, msg } => self.message(now, from, msg, &mut out),
            Input::Result { post, caller } => {
                let answer = self.accept(now, post, caller, &mut out);
                out.push(Action::Answer(answer));
            }
            Input::Ran { post, from } => self.ran(now, post, from, &mut out),
            Input::RanAlong { post } => self.own_result(now, post, None, &mut out),
            Input::PeerDown { addr, died } => {
                if !died {
                    self.fence.left(addr);
                }
                self.requeue_worker(now, addr, died, &mut out)
            }
            Input::PeerUp { id, addr } => {
                if self.incarnations.insert(addr, id.clone()).is_some_and(|old| old != id) {
                    tracing::info!(peer = %addr, "peer restarted: requeueing its tasks");
                    self.requeue_worker(now, addr, true, &mut out);
                }
            }
            Input::TakeOver { failed } => self.take_over_fenced(now, failed, &mut out),
            Input::Merge { records, from } => self.merge(records, from, &mut out),
            Input::Flush => {
                let dirty = std::mem::take(&mut self.dirty);
                let deltas: Vec<EvalRecord> = dirty
                    .iter()
                    .filter_map(|(id, results)| self.evals.get(id).map(|r| r.delta(results)))
                    .collect();
                if !deltas.is_empty() {
                    out.push(Action::Replicate(deltas));
                }
            }
            Input::Propose { copy, from } => self.proposed(copy, from, &mut out),
            Input::Voted { vote, from } => self.voted(now, vote, from, &mut out),
            Input::Delivered(answers) => self.delivered(answers),
        }
        self.resume_deferred(now, &mut out);
        self.commit_ready(now, &mut out);
        self.end_phase1(now, &mut out);
        self.dispatch(now, &mut out);
        self.send_proposals(now, &mut out);
        self.send_outbox(now, &mut out);
        self.fence.remember_members(&mut out);
        out
    }

    fn me(&self) -> NodeAddr {
        NodeAddr::from(self.cfg.me)
    }

    /// Marks a record changed (header, and `results` added): persisted now, replicated at the
    /// next flush.
    fn changed(&mut self, id: EvalId, results: &[TaskId], out: &mut Vec<Action>) {
        let Some(rec) = self.evals.get(&id) else { return };
        out.push(Action::Persist(rec.delta(results)));
        self.dirty.entry(id).or_default().extend(results.iter().cloned());
    }

    fn submitted(&mut self, rec: EvalRecord, out: &mut Vec<Action>) {
        let id = rec.id;
        let projects = rec.projects.clone();
        self.evals.insert(id, rec);
        self.changed(id, &[], out);
        for p in projects {
            self.discover(id, p, out);
        }
    }

    fn discover(&mut self, eval: EvalId, project: ProjectRecord, out: &mut Vec<Action>) {
        if matches!(project.state, ProjectState::Preparing) && self.discovering.insert(project.id.clone()) {
            out.push(Action::Discover { eval, project });
        }
    }

    fn discovered(
        &mut self,
        now: Now,
        eval: EvalId,
        pid: &ProjectId,
        outcome: Result<Discovery, String>,
        out: &mut Vec<Action>,
    ) {
        self.discovering.remove(pid);
        let Some(rec) = self.evals.get(&eval) else { return };
        let Some(p) = rec.project(pid).filter(|p| matches!(p.state, ProjectState::Preparing)) else { return };
        let state = match outcome {
            Ok(d) if d.modules.is_empty() => ProjectState::Failed { error: NO_TESTS.into() },
            Ok(d) => ProjectState::Ready {
                chunks: self.plan_chunks(&p.name, &d.modules),
                modules: d.modules,
                runner: d.runner,
                limits: d.limits,
                policies: d.policies,
            },
            Err(error) => ProjectState::Failed { error },
        };
        let Some(rec) = self.evals.get_mut(&eval) else { return };
        if let Some(p) = rec.projects.iter_mut().find(|p| &p.id == pid) {
            p.state = state;
        }
        rec.version += 1;
        rec.settle(now.wall);
        self.changed(eval, &[], out);
        out.push(Action::PushCache);
    }

    /// How many chunks each slow module runs as: the duration planner over the remembered
    /// durations, for the network's worker slots.
    pub fn plan_chunks(&self, project: &str, modules: &[String]) -> BTreeMap<String, u32> {
        let slots = (self.peers.len() + 1) * self.cfg.slots;
        let known = |m: &str| self.durations.get(&duration_key(project, m)).copied();
        cdtester_runner_api::plan::plan(modules, known, slots)
            .into_iter()
            .filter_map(|t| Some((t.module, t.chunk?.count)))
            .collect()
    }

    fn message(&mut self, now: Now, from: SocketAddr, msg: Message, out: &mut Vec<Action>) {
        if from == self.cfg.me {
            return;
        }
        match msg {
            Message::TaskAnnounce(_) => {
                self.announcers.insert(from, now.mono);
                if self.busy < self.cfg.slots {
                    self.request_work(from, out);
                }
            }
            Message::TaskRequest(_) => self.hand_out(now, from, out),
            Message::TaskSend(data) => self.task_sent(from, data.info, out),
            Message::TaskConfirm(data) => match data.task_id.parse::<TaskId>() {
                Ok(task) => self.confirm(from, &task, out),
                Err(e) => tracing::debug!(%from, "TASK_CONFIRM ignored: {e}"),
            },
            _ => {}
        }
    }

    fn request_work(&self, to: SocketAddr, out: &mut Vec<Action>) {
        if let Some(id) = self.id.clone() {
            out.push(Action::Send { to, msg: Message::TaskRequest(crate::wire::NodeIdData { id }) });
        }
    }

    /// A task this node ran finished: accept its result here when this node is responsible,
    /// deliver it otherwise; the slot takes the next task (in [`Engine::dispatch`]) and asks the
    /// nodes that announced work recently.
    fn ran(&mut self, now: Now, post: TaskPost, from: Option<SocketAddr>, out: &mut Vec<Action>) {
        self.busy = self.busy.saturating_sub(1);
        self.own_result(now, post, from, out);
        let recent = self.cfg.announce_every.saturating_mul(3);
        self.announcers.retain(|_, at| now.mono.saturating_duration_since(*at) <= recent);
        if self.busy < self.cfg.slots && !self.has_pending() {
            let targets: Vec<SocketAddr> = self.announcers.keys().copied().collect();
            for t in targets {
                self.request_work(t, out);
            }
        }
    }

    /// The result of a task run on this node's slot: accepted here when this node is
    /// responsible, delivered otherwise.
    fn own_result(&mut self, now: Now, post: TaskPost, from: Option<SocketAddr>, out: &mut Vec<Action>) {
        let task = post.result.task_id.parse::<TaskId>().ok();
        if let Some(task) = &task {
            self.here.remove(task);
        }
        match self.delivery(&post) {
            Delivery::Done => {}
            Delivery::Here => match self.accept(now, post.clone(), self.cfg.me, out) {
                Err(Refusal::Unavailable(_)) => self.queue_delivery(now, post, from),
                Err(e) => tracing::warn!("own result refused: {e}"),
                Ok(_) => {}
            },
            Delivery::To(_) | Delivery::Unknown => self.queue_delivery(now, post, from),
        }
        if let (None, Some(task)) = (from, &task) {
            self.end_local_assignment(task, out);
        }
    }

    /// Where `post` goes now.
    pub fn delivery(&self, post: &TaskPost) -> Delivery {
        let Some(rec) = post.eval_id.and_then(|id| self.evals.get(&id)) else { return Delivery::Unknown };
        if post.result.task_id.parse::<TaskId>().is_ok_and(|t| rec.results.contains_key(&t)) {
            return Delivery::Done;
        }
        if rec.responsible == self.cfg.me { Delivery::Here } else { Delivery::To(rec.responsible.socket()) }
    }

    /// This node now owns the failed node's evaluations: re-own them (new term), adopt the
    /// tasks running on live workers, requeue the others and discover unsettled projects.
    fn take_over(&mut self, now: Now, failed: SocketAddr, out: &mut Vec<Action>) {
        let ids: Vec<EvalId> = self
            .evals
            .values()
            .filter(|r| r.responsible == failed && r.end_time.is_none())
            .map(|r| r.id)
            .collect();
        tracing::info!(%failed, evaluations = ids.len(), "taking over evaluations");
        let me = self.me();
        for id in ids {
            let Some(rec) = self.evals.get_mut(&id) else { continue };
            rec.term = quorum::next_term(rec.term, &me.to_string());
            rec.version = 0;
            rec.responsible = me;
            let projects = rec.projects.clone();
            self.changed(id, &[], out);
            self.start_phase1(id);
            self.adopt_running(now, id, Some(failed), out);
            for p in projects {
                out.push(Action::Broadcast(Message::EvaluationResponsibilityUpdate(
                    crate::wire::ResponsibilityUpdateData {
                        project_id: p.id.to_string(),
                        new_node: me.to_string(),
                    },
                )));
                self.discover(id, p, out);
            }
        }
        self.requeue_worker(now, failed, true, out);
    }

    /// After the hold that follows a restart: schedule what this node is still responsible for.
    fn resume(&mut self, now: Now, out: &mut Vec<Action>) {
        let me = self.me();
        for id in std::mem::take(&mut self.held) {
            let Some(rec) = self.evals.get(&id).filter(|r| r.responsible == me && r.end_time.is_none())
            else {
                continue;
            };
            tracing::info!(eval = %id, "resuming evaluation after restart");
            let projects = rec.projects.clone();
            self.start_phase1(id);
            // Tasks this node ran when it stopped count a worker death; those running elsewhere
            // stay with their workers.
            self.adopt_running(now, id, Some(self.cfg.me), out);
            for p in projects {
                self.discover(id, p, out);
            }
        }
    }

    /// Fills free slots with this node's own tasks, and announces the others.
    fn dispatch(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.resume_at.is_some_and(|t| now.mono >= t) {
            self.resume_at = None;
            self.resume(now, out);
        }
        while self.busy < self.cfg.slots {
            let Some(mut task) = self.take_next(now, self.cfg.me, out) else { break };
            task.with = self.companions(now, &task, out);
            self.busy += 1;
            self.here.insert(task.task_id.clone());
            self.here.extend(task.with.iter().cloned());
            out.push(Action::Run(task));
        }
        let due = self.next_announce.is_none_or(|t| now.mono >= t);
        if due
            && !self.peers.is_empty()
            && self.has_pending()
            && let Some(id) = self.id.clone()
        {
            self.next_announce = Some(now.mono + self.cfg.announce_every);
            out.push(Action::Broadcast(Message::TaskAnnounce(crate::wire::NodeIdData { id })));
        }
    }

    // ------------------------------------------------------------------ queries

    /// Whether an evaluation id is taken.
    pub fn knows(&self, id: EvalId) -> bool {
        self.evals.contains_key(&id)
    }

    /// Every evaluation id, oldest first.
    pub fn list(&self) -> Vec<EvalId> {
        let mut v: Vec<(f64, EvalId)> = self.evals.values().map(|r| (r.start_time, r.id)).collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, id)| id).collect()
    }

    pub fn record(&self, id: EvalId) -> Option<&EvalRecord> {
        self.evals.get(&id)
    }

    pub fn records(&self) -> impl Iterator<Item = &EvalRecord> {
        self.evals.values()
    }

    /// The project with this id, in whichever evaluation holds it.
    pub fn project(&self, project_id: &ProjectId) -> Option<(&EvalRecord, &ProjectRecord)> {
        self.evals.values().find_map(|r| r.project(project_id).map(|p| (r, p)))
    }

    /// Projects of unfinished evaluations.
    pub fn active_projects(&self) -> impl Iterator<Item = &ProjectRecord> {
        self.evals.values().filter(|r| r.end_time.is_none()).flat_map(|r| r.projects.iter())
    }

    /// Slots running a task now.
    pub fn busy(&self) -> usize {
        self.busy
    }
}

#[cfg(test)]
mod tests;
