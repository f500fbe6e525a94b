//! Deterministic whole-system simulation: N nodes, each a protocol core (run by
//! [`crate::core::sim`], with its loss, duplication, reordering and partitions), an [`Engine`],
//! a store that survives restarts, and a simulated runner (module outcomes and durations,
//! infrastructure errors, hangs, tasks that kill their node). HTTP calls (result delivery,
//! replication, the digest exchange, record fetches) travel through a seeded lossy queue that
//! honours the same partitions. Invariants are checked after every step and at the end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cdtester_config::Timers;
use cdtester_runner_api::plan::ModuleStat;
use cdtester_runner_api::{ModuleReport, Outcome, TestResult};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{
    Accepted, Action, BatchAnswer, Discovery, Engine, EngineConfig, Input, Now, Refusal, SyncRequest,
    SyncResponse, Task, TaskPost,
};
use crate::core::sim::{NetConfig, Sim};
use crate::core::{DownReason, Event, LocalEvent};
use crate::eval::{EvalRecord, ProjectRecord, ProjectState};
use crate::ids::{EvalId, NodeAddr, ProjectId, TaskId};

/// One step of the world, ms.
const STEP: u64 = 50;
const EPOCH_S: f64 = 1_800_000_000.0;

/// What a simulated module does when it runs.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Tests {
        passed: u8,
        failed: u8,
        ms: u64,
    },
    /// The runner cannot run it (an infrastructure error).
    InfraError,
    /// Runs into its time limit.
    Hang,
    /// Kills the node running it.
    Crash,
}

/// An HTTP call between nodes.
#[derive(Debug, Clone)]
enum Call {
    /// Results delivered together, and the answers to them.
    Results(Vec<TaskPost>),
    Answers(Vec<BatchAnswer>),
    Replicate(Vec<EvalRecord>),
    SyncAsk(SyncRequest),
    SyncAnswer(SyncResponse),
    Fetch(EvalId),
    /// A responsible node's proposal, and a member's vote answering it.
    Propose(EvalRecord),
    Vote(Box<super::Vote>),
}

#[derive(Debug)]
struct Job {
    at: u64,
    task: Task,
    outcome: Result<ModuleReport, String>,
    crash: bool,
    /// A companion of another job's task (reported as [`Input::RanAlong`], before it).
    along: bool,
}

#[derive(Default)]
struct Node {
    engine: Option<Engine>,
    records: BTreeMap<EvalId, EvalRecord>,
    durations: HashMap<String, ModuleStat>,
    /// The members the engine last counted for majorities (kept across restarts).
    members: Vec<SocketAddr>,
    jobs: Vec<Job>,
    /// Tasks waiting for their record (fetched from the node that sent them), with a deadline.
    waiting: Vec<(Task, u64)>,
    discoveries: Vec<(u64, EvalId, ProjectRecord)>,
    cursor: usize,
    down_until: Option<u64>,
    /// The first result seen per task on this node (engine or store): never replaced.
    seen: BTreeMap<EvalId, BTreeMap<TaskId, String>>,
    /// Highest `/stats` `all` (passed, failed) seen.
    stats: (u64, u64),
    /// The active evaluations last handed to the core.
    active: Option<BTreeMap<String, crate::wire::EvalMap>>,
}

/// Fault and workload parameters of one run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub nodes: usize,
    pub evaluations: usize,
    pub loss: f64,
    pub duplicate: f64,
    /// Random node kills (with restarts) during the fault window.
    pub faults: bool,
    /// One partition (a node cut off, then healed) during the fault window.
    pub partitions: bool,
    /// Inject a bug into every engine (to show the invariants catch it).
    pub bug: Option<super::Bug>,
}

/// The simulated world.
pub struct World {
    sc: Scenario,
    sim: Sim,
    nodes: Vec<Node>,
    rng: StdRng,
    base: Instant,
    queue: BTreeMap<(u64, u64), (usize, usize, Call)>,
    seq: u64,
    groups: Option<Vec<usize>>,
    partitioned: bool,
    /// Truth: behaviour of each module by project name.
    projects: BTreeMap<String, Vec<(String, Behaviour)>>,
    submitted: Vec<EvalId>,
    /// Result posts answered `Stored`, per (node, evaluation, task).
    stored: BTreeMap<(usize, Option<EvalId>, String), u32>,
    /// The first result (attempt, node) seen per task on any node: the one accepted result.
    accepted: BTreeMap<EvalId, BTreeMap<TaskId, (String, usize)>>,
}

fn addr(i: usize) -> SocketAddr {
    Sim::addr(i)
}

fn engine_config(i: usize) -> EngineConfig {
    EngineConfig {
        me: addr(i),
        http_port: 9000,
        slots: 2,
        confirm_timeout: Duration::from_millis(1000),
        announce_every: Duration::from_millis(300),
        hold: Duration::from_millis(4000),
        open: false,
        // Partitions here last 5 s on average (a 1% chance of healing every 50 ms step): one
        // over a minute, which could let the cut-off node count itself a majority, has odds of
        // about 1 in 160,000.
        quorum_hold: Duration::from_secs(60),
    }
}

impl World {
    pub fn new(sc: Scenario) -> World {
        let net = NetConfig {
            loss: sc.loss,
            duplicate: sc.duplicate,
            min_delay_ms: 1,
            max_delay_ms: 30,
            seed: sc.seed,
            ..NetConfig::default()
        };
        let sim = Sim::cluster(net, Timers::default(), sc.nodes);
        let base = Instant::now();
        let mut rng = StdRng::seed_from_u64(sc.seed ^ 0x5EED_E461_4E00);
        let projects: BTreeMap<String, Vec<(String, Behaviour)>> =
            (0..sc.evaluations * 2).map(|p| (format!("p{p}"), modules(&mut rng))).collect();
        // Every node starts with remembered durations, as a node with history does.
        let history: HashMap<String, ModuleStat> = projects
            .iter()
            .flat_map(|(name, modules)| {
                modules.iter().filter_map(move |(module, b)| match b {
                    Behaviour::Tests { passed, failed, ms } => Some((
                        super::duration_key(name, module),
                        ModuleStat { secs: *ms as f64 / 1000.0, tests: u64::from(passed + failed) },
                    )),
                    _ => None,
                })
            })
            .collect();
        let nodes = (0..sc.nodes)
            .map(|i| Node {
                engine: Some(Engine::new(engine_config(i), Vec::new(), history.clone(), Vec::new(), base)),
                durations: history.clone(),
                ..Node::default()
            })
            .collect();
        let mut w = World {
            sim,
            nodes,
            rng,
            base,
            queue: BTreeMap::new(),
            seq: 0,
            groups: None,
            partitioned: false,
            projects,
            submitted: Vec::new(),
            stored: BTreeMap::new(),
            accepted: BTreeMap::new(),
            sc,
        };
        for n in &mut w.nodes {
            if let Some(e) = &mut n.engine {
                e.bug = w.sc.bug;
            }
        }
        w
    }

    fn now(&self) -> Now {
        let ms = self.sim.now_ms();
        Now { mono: self.base + Duration::from_millis(ms), wall: EPOCH_S + ms as f64 / 1000.0 }
    }

    fn ms(&self) -> u64 {
        self.sim.now_ms()
    }

    /// Runs the whole scenario; `Err` names the seed and what broke.
    pub fn run(mut self) -> Result<(), String> {
        let seed = self.sc.seed;
        let fail = |e: String| format!("seed {seed}: {e}");
        self.steps_until(2_000).map_err(fail)?;
        let fault_end = 9_000;
        while self.ms() < fault_end {
            if self.submitted.len() < self.sc.evaluations && self.rng.random_bool(0.1) {
                self.submit();
            }
            self.faults();
            self.step().map_err(fail)?;
        }
        while self.submitted.len() < self.sc.evaluations {
            self.submit();
        }
        self.heal_all();
        let limit = self.ms() + 150_000;
        while self.ms() < limit {
            self.step().map_err(fail)?;
            if self.ms().is_multiple_of(1000) && self.all_finished() && self.converged() {
                break;
            }
        }
        if std::env::var_os("CDT_SIM_TRACE").is_some() {
            let results: usize = self.engine(0).map_or(0, |e| e.records().map(|r| r.results.len()).sum());
            eprintln!(
                "seed {seed}: ended at {} ms, {} evaluations, {results} results, partitioned {}",
                self.ms(),
                self.submitted.len(),
                self.partitioned
            );
        }
        self.check_end().map_err(fail)
    }

    fn steps_until(&mut self, ms: u64) -> Result<(), String> {
        while self.ms() < ms {
            self.step()?;
        }
        Ok(())
    }

    /// A new evaluation at a random live node: one to three projects, or (15% of them) six to twelve.
    fn submit(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].engine.is_some()).collect();
        if live.is_empty() {
            return;
        }
        let i = live[self.rng.random_range(0..live.len())];
        let n = 1_000_000 + self.rng.random_range(0..1_000_000_u64) * 1000 + self.submitted.len() as u64;
        let id = EvalId::new(n).expect("below 2^53");
        let count = if self.rng.random_bool(0.15) {
            self.rng.random_range(6..=12)
        } else {
            self.rng.random_range(1..=3)
        };
        let names: Vec<String> = self.projects.keys().cloned().collect();
        let projects = (0..count)
            .map(|k| ProjectRecord {
                id: ProjectId::of(id, k),
                name: names[self.rng.random_range(0..names.len())].clone(),
                url: None,
                content_hash: "c".repeat(64),
                state: ProjectState::Preparing,
            })
            .collect();
        let mut rec = EvalRecord::new(id, NodeAddr::from(addr(i)), self.now().wall, projects);
        crate::eval::unique_names(&mut rec.projects);
        self.submitted.push(id);
        self.input(i, Input::Submitted(rec));
        // The node replicates a submission before answering it.
        self.input(i, Input::Flush);
    }

    /// Random kills (never more than a minority down) and one partition, then its healing.
    fn faults(&mut self) {
        if self.sc.faults && self.may_kill() && self.rng.random_bool(0.006) {
            let i = self.rng.random_range(0..self.nodes.len());
            self.kill(i);
        }
        let down = self.nodes.iter().filter(|n| n.engine.is_none()).count();
        if self.sc.partitions
            && !self.partitioned
            && down < (self.nodes.len() - 1) / 2
            && self.ms() > 3_000
            && self.rng.random_bool(0.004)
        {
            let cut = self.rng.random_range(0..self.nodes.len());
            let groups: Vec<usize> = (0..self.nodes.len()).map(|i| usize::from(i == cut)).collect();
            self.sim.partition(groups.clone());
            self.groups = Some(groups);
            self.partitioned = true;
        }
        if self.groups.is_some() && self.rng.random_bool(0.01) {
            self.sim.heal();
            self.groups = None;
        }
    }

    /// Whether one more node may go down: never more than a minority is unreachable (down, or
    /// cut off by a partition).
    fn may_kill(&self) -> bool {
        let down = self.nodes.iter().filter(|n| n.engine.is_none()).count();
        let cut = usize::from(self.groups.is_some());
        down + cut < (self.nodes.len() - 1) / 2
    }

    fn heal_all(&mut self) {
        self.sim.heal();
        self.groups = None;
    }

    fn kill(&mut self, i: usize) {
        if self.nodes[i].engine.is_none() {
            return;
        }
        if std::env::var_os("CDT_SIM_TRACE").is_some() {
            eprintln!("t={} kill {i}", self.ms());
        }
        self.sim.crash(i);
        let until = self.ms() + self.rng.random_range(2_000..5_000);
        let n = &mut self.nodes[i];
        n.engine = None;
        n.jobs.clear();
        n.waiting.clear();
        n.discoveries.clear();
        n.down_until = Some(until);
    }

    fn restart(&mut self, i: usize) {
        let up = |j: &usize| *j != i && self.nodes[*j].engine.is_some();
        let connected = (0..self.nodes.len()).filter(up).max_by_key(|&j| self.sim.core(j).peers().count());
        let Some(via) = connected else { return };
        self.sim.restart(i, via);
        let records = self.nodes[i].records.values().cloned().collect();
        let durations = self.nodes[i].durations.clone();
        let members = self.nodes[i].members.clone();
        if std::env::var_os("CDT_SIM_TRACE").is_some() {
            eprintln!("t={} restart {i}", self.ms());
        }
        let mut engine = Engine::new(engine_config(i), records, durations, members, self.now().mono);
        engine.bug = self.sc.bug;
        let n = &mut self.nodes[i];
        n.engine = Some(engine);
        n.cursor = 0;
        n.active = None;
        n.down_until = None;
    }

    /// One step: the protocol cores, HTTP calls due, every node's timers, then the invariants.
    fn step(&mut self) -> Result<(), String> {
        self.sim.run_for(STEP);
        if std::env::var_os("CDT_SIM_TRACE").is_some() && self.ms().is_multiple_of(1000) {
            let peers: Vec<usize> = (0..self.nodes.len()).map(|j| self.sim.core(j).peers().count()).collect();
            let up: Vec<bool> = self.nodes.iter().map(|n| n.engine.is_some()).collect();
            eprintln!("t={} peers {peers:?} up {up:?} groups {:?}", self.ms(), self.groups);
        }
        let now = self.ms();
        while let Some((&(at, seq), _)) = self.queue.first_key_value() {
            if at > now {
                break;
            }
            let Some((to, from, call)) = self.queue.remove(&(at, seq)) else { break };
            self.receive(to, from, call)?;
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].down_until.is_some_and(|t| t <= now) {
                self.restart(i);
            }
            if self.nodes[i].engine.is_some() {
                self.node_step(i)?;
            }
        }
        self.check_step()
    }

    fn node_step(&mut self, i: usize) -> Result<(), String> {
        let now = self.ms();
        let events: Vec<Event> =
            self.sim.events(i)[self.nodes[i].cursor..].iter().map(|l| l.event.clone()).collect();
        self.nodes[i].cursor += events.len();
        for ev in events {
            self.core_event(i, ev);
        }
        let peers = self.sim.core(i).peers().map(|(_, a)| a).collect();
        let id = self.sim.core(i).id().cloned();
        self.input(i, Input::Members { id, peers });
        self.input(i, Input::Tick);
        // Like the node: the core gets the active evaluations it carries in elections (when
        // they changed).
        if let Some(active) = self.engine(i).map(Engine::active_evaluations)
            && self.nodes[i].active.as_ref() != Some(&active)
        {
            self.nodes[i].active = Some(active.clone());
            self.sim.local(i, LocalEvent::SetActive(active));
        }
        self.finish_jobs(i);
        self.start_waiting(i);
        let due: Vec<(u64, EvalId, ProjectRecord)> = {
            let d = &mut self.nodes[i].discoveries;
            let (due, later) = std::mem::take(d).into_iter().partition(|(at, ..)| *at <= now);
            *d = later;
            due
        };
        for (_, eval, project) in due {
            let outcome = self.discovery(&project);
            self.input(i, Input::Discovered { eval, project: project.id, outcome });
        }
        if now.is_multiple_of(250) {
            self.input(i, Input::Flush);
        }
        if now.is_multiple_of(2_000) {
            let peers: Vec<SocketAddr> = self.sim.core(i).peers().map(|(_, a)| a).collect();
            if !peers.is_empty() {
                let to = peers[self.rng.random_range(0..peers.len())];
                let ask = self.engine(i).map(Engine::digests);
                if let (Some(j), Some(ask)) = (self.sim.node_at(to), ask) {
                    self.http(i, j, Call::SyncAsk(ask));
                }
            }
        }
        Ok(())
    }

    fn engine(&self, i: usize) -> Option<&Engine> {
        self.nodes[i].engine.as_ref()
    }

    fn discovery(&mut self, project: &ProjectRecord) -> Result<Discovery, String> {
        let modules = self.projects.get(&strip_suffix(&project.name)).cloned().unwrap_or_default();
        if modules.is_empty() {
            return Err(super::NO_TESTS.into());
        }
        Ok(Discovery {
            modules: modules.into_iter().map(|(m, _)| m).collect(),
            runner: "local".into(),
            // A short time limit: a task whose worker silently lost it is handed out again
            // when its lease (twice the limit plus a minute) runs out, within the simulation.
            limits: cdtester_runner_api::Limits { timeout_s: 10, ..Default::default() },
            policies: Vec::new(),
        })
    }

    fn core_event(&mut self, i: usize, ev: Event) {
        match ev {
            Event::App { from, msg, .. } => {
                self.input(i, Input::Message { from, msg });
            }
            Event::PeerDown { addr, reason, .. } => {
                self.input(i, Input::PeerDown { addr, died: reason == DownReason::Failed });
            }
            Event::TakeOver { failed_addr, .. } => {
                self.input(i, Input::TakeOver { failed: failed_addr });
            }
            Event::PeerUp { id, addr } => {
                self.input(i, Input::PeerUp { id, addr });
                // Like the node: a digest exchange with a peer that comes up.
                let ask = self.engine(i).map(Engine::digests);
                if let (Some(j), Some(ask)) = (self.sim.node_at(addr), ask) {
                    self.http(i, j, Call::SyncAsk(ask));
                }
            }
            _ => {}
        }
    }

    /// Feeds an input to node `i`'s engine and carries out its actions; returns the answer to
    /// a result post.
    fn input(&mut self, i: usize, input: Input) -> Option<Result<Accepted, Refusal>> {
        self.input_voting(i, input).0
    }

    /// [`World::input`], also returning the vote answering a proposal.
    fn input_voting(
        &mut self,
        i: usize,
        input: Input,
    ) -> (Option<Result<Accepted, Refusal>>, Option<super::Vote>) {
        let now = self.now();
        let Some(engine) = self.nodes[i].engine.as_mut() else { return (None, None) };
        let actions = engine.handle(now, input);
        let (mut answer, mut vote) = (None, None);
        for a in actions {
            match a {
                Action::Answer(r) => answer = Some(r),
                Action::Vote(v) => vote = Some(v),
                other => self.execute(i, other),
            }
        }
        (answer, vote)
    }

    fn execute(&mut self, i: usize, action: Action) {
        let now = self.ms();
        match action {
            Action::Persist(rec) => persist(&mut self.nodes[i].records, rec),
            Action::Discover { eval, project } => {
                let at = now + self.rng.random_range(50..400);
                self.nodes[i].discoveries.push((at, eval, project));
            }
            Action::Run(task) => self.run_task(i, task),
            Action::Send { to, msg } => {
                if matches!(msg, crate::wire::Message::TaskSend(_)) {
                    let member = self.sim.core(i).peers().any(|(_, a)| a == to);
                    assert!(member, "seed {}: node {i} handed a task to {to}, not a member", self.sc.seed);
                }
                self.sim.local(i, LocalEvent::Send { to, msg });
            }
            Action::Broadcast(msg) => self.sim.local(i, LocalEvent::Broadcast(msg)),
            Action::DeliverBatch { to, posts } => {
                if let Some(j) = self.sim.node_at(to) {
                    self.http(i, j, Call::Results(posts));
                }
            }
            Action::RememberDuration { key, stat } => {
                self.nodes[i].durations.insert(key, stat);
            }
            Action::RememberMembers(members) => self.nodes[i].members = members,
            Action::Replicate(records) => {
                let peers: Vec<usize> =
                    self.sim.core(i).peers().filter_map(|(_, a)| self.sim.node_at(a)).collect();
                for j in peers {
                    self.http(i, j, Call::Replicate(records.clone()));
                }
            }
            Action::Propose { to, copy } => {
                if let Some(j) = self.sim.node_at(to) {
                    self.http(i, j, Call::Propose(copy));
                }
            }
            Action::Answer(_)
            | Action::Vote(_)
            | Action::PushCache
            | Action::Prefetch { .. }
            | Action::Merged(_) => {}
        }
    }

    fn run_task(&mut self, i: usize, task: Task) {
        if task.project.is_none() {
            if let Some(j) = task.from.and_then(|f| self.sim.node_at(f)) {
                self.http(i, j, Call::Fetch(task.eval));
            }
            let deadline = self.ms() + 2_000;
            self.nodes[i].waiting.push((task, deadline));
            return;
        }
        // Companions run first in the same session; the task's own result frees the slot last.
        let mut jobs = Vec::new();
        let mut at = self.ms();
        for c in &task.with {
            let along = Task { task_id: c.clone(), with: Vec::new(), ..task.clone() };
            let (ms, outcome, crash) = self.simulate(&along);
            at += ms;
            jobs.push(Job { at: 0, task: along, outcome, crash, along: true });
        }
        let (ms, outcome, crash) = self.simulate(&task);
        at += ms;
        jobs.push(Job { at, task, outcome, crash, along: false });
        for mut job in jobs {
            job.at = at;
            self.nodes[i].jobs.push(job);
        }
    }

    /// How long `task` runs in the simulated runner, what it reports and whether it kills its
    /// node.
    fn simulate(&mut self, task: &Task) -> (u64, Result<ModuleReport, String>, bool) {
        let behaviour = self
            .projects
            .get(&strip_suffix(task.project.as_ref().map_or("", |p| p.name.as_str())))
            .and_then(|ms| ms.iter().find(|(m, _)| *m == task.task_id.module()).map(|(_, b)| *b));
        match behaviour {
            Some(Behaviour::Tests { passed, failed, ms }) => {
                (ms, Ok(report(task.task_id.module(), passed, failed, ms)), false)
            }
            Some(Behaviour::InfraError) => (100, Err("the runner failed".to_string()), false),
            Some(Behaviour::Hang) => (4_000, Ok(timeout_report(task.task_id.module())), false),
            // It kills its node, unless that would take down a majority (then only its worker).
            Some(Behaviour::Crash) => {
                (300, Err("the worker was killed by signal 9".to_string()), self.may_kill())
            }
            None => (10, Err(format!("no module {}", task.task_id.module())), false),
        }
    }

    fn start_waiting(&mut self, i: usize) {
        let now = self.ms();
        let waiting = std::mem::take(&mut self.nodes[i].waiting);
        for (mut task, deadline) in waiting {
            let ready = self
                .engine(i)
                .and_then(|e| e.record(task.eval))
                .and_then(|r| r.project(task.task_id.project()))
                .filter(|p| matches!(p.state, ProjectState::Ready { .. }))
                .cloned();
            if let Some(p) = ready {
                task.project = Some(p);
                self.run_task(i, task);
            } else if now >= deadline {
                let from = task.from;
                let post = post(i, &task, Err("the project's record never came".into()), now);
                self.input(i, Input::Ran { post, from });
            } else {
                self.nodes[i].waiting.push((task, deadline));
            }
        }
    }

    fn finish_jobs(&mut self, i: usize) {
        let now = self.ms();
        let (done, running): (Vec<Job>, Vec<Job>) =
            std::mem::take(&mut self.nodes[i].jobs).into_iter().partition(|j| j.at <= now);
        self.nodes[i].jobs = running;
        for job in done {
            if job.crash && self.may_kill() {
                self.kill(i);
                return;
            }
            let from = job.task.from;
            let post = post(i, &job.task, job.outcome, now);
            if job.along {
                self.input(i, Input::RanAlong { post });
            } else {
                self.input(i, Input::Ran { post, from });
            }
        }
    }

    /// Counts a result post answered `Stored`; a second one for the same task at one node is a
    /// second accepted result.
    fn count_stored(
        &mut self,
        node: usize,
        post: &TaskPost,
        answer: &Option<Result<Accepted, Refusal>>,
    ) -> Result<(), String> {
        if matches!(answer, Some(Ok(Accepted::Stored))) {
            let (eval, task) = (post.eval_id, post.result.task_id.clone());
            let n = self.stored.entry((node, eval, task.clone())).or_insert(0);
            *n += 1;
            if *n > 1 {
                return Err(format!("node {node} accepted task {task} of {eval:?} {n} times"));
            }
        }
        Ok(())
    }

    /// Sends an HTTP call from node `from` to node `to` (lost, duplicated or delayed at random;
    /// dropped across a partition).
    fn http(&mut self, from: usize, to: usize, call: Call) {
        if self.groups.as_ref().is_some_and(|g| g[from] != g[to]) || self.rng.random_bool(self.sc.loss) {
            return;
        }
        let copies = if self.rng.random_bool(self.sc.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            self.seq += 1;
            let at = self.ms() + self.rng.random_range(1..=80);
            self.queue.insert((at, self.seq), (to, from, call.clone()));
        }
    }

    fn receive(&mut self, to: usize, from: usize, call: Call) -> Result<(), String> {
        if self.nodes[to].engine.is_none() {
            return Ok(());
        }
        match call {
            Call::Results(posts) => {
                let mut answers = Vec::new();
                for post in posts {
                    let answer = self.input(to, Input::Result { post: post.clone(), caller: addr(from) });
                    self.count_stored(to, &post, &answer)?;
                    if let Some(a) = answer {
                        answers.push(BatchAnswer::new(&post, &a));
                    }
                }
                self.http(to, from, Call::Answers(answers));
            }
            Call::Answers(answers) => {
                self.input(to, Input::Delivered(answers));
            }
            Call::Replicate(records) => {
                self.input(to, Input::Merge { records, from: addr(from) });
            }
            Call::SyncAsk(req) => {
                if let Some(resp) = self.engine(to).map(|e| e.answer_sync(&req)) {
                    self.http(to, from, Call::SyncAnswer(resp));
                }
            }
            Call::SyncAnswer(resp) => {
                self.input(to, Input::Merge { records: resp.records, from: addr(from) });
                let wanted: Vec<EvalRecord> = self
                    .engine(to)
                    .map(|e| resp.want.iter().filter_map(|id| e.record(*id).cloned()).collect())
                    .unwrap_or_default();
                if !wanted.is_empty() {
                    self.http(to, from, Call::Replicate(wanted));
                }
            }
            Call::Fetch(eval) => {
                if let Some(rec) = self.engine(to).and_then(|e| e.record(eval)).cloned() {
                    self.http(to, from, Call::Replicate(vec![rec]));
                }
            }
            Call::Propose(copy) => {
                if let (_, Some(vote)) = self.input_voting(to, Input::Propose { copy, from: addr(from) }) {
                    self.http(to, from, Call::Vote(Box::new(vote)));
                }
            }
            Call::Vote(vote) => {
                self.input(to, Input::Voted { vote: *vote, from: addr(from) });
            }
        }
        Ok(())
    }

    fn all_finished(&self) -> bool {
        self.nodes.iter().all(|n| {
            n.engine.as_ref().is_some_and(|e| {
                self.submitted.iter().all(|id| e.record(*id).is_some_and(|r| r.end_time.is_some()))
            })
        })
    }

    /// Every node holds results for the same tasks.
    fn converged(&self) -> bool {
        let keys = |n: &Node| -> Option<Vec<(EvalId, BTreeSet<TaskId>)>> {
            let e = n.engine.as_ref()?;
            Some(e.records().map(|r| (r.id, r.results.keys().cloned().collect())).collect())
        };
        let first = keys(&self.nodes[0]);
        first.is_some() && self.nodes.iter().all(|n| keys(n) == first)
    }

    /// After every step: no node replaces a result it holds or accepts a task's result twice,
    /// no two nodes hold different results for a task (exactly one accepted result per task in
    /// the whole system), and `/stats` `all` never decreases and equals the sum of the node's
    /// results.
    fn check_step(&mut self) -> Result<(), String> {
        let full = self.ms().is_multiple_of(500);
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            let records: Vec<&EvalRecord> = match &node.engine {
                Some(e) => e.records().collect(),
                None => node.records.values().collect(),
            };
            for rec in &records {
                let seen = node.seen.entry(rec.id).or_default();
                let first = self.accepted.entry(rec.id).or_default();
                for (t, r) in &rec.results {
                    match seen.get(t) {
                        Some(a) if *a != r.attempt => {
                            return Err(format!("node {i} replaced the result of {t}: {a} -> {}", r.attempt));
                        }
                        Some(_) => continue,
                        None => {
                            seen.insert(t.clone(), r.attempt.clone());
                        }
                    }
                    match first.get(t) {
                        Some((a, j)) if *a != r.attempt => {
                            return Err(format!(
                                "two results accepted for task {t} of {}: {a} on node {j}, {} on node {i}",
                                rec.id, r.attempt
                            ));
                        }
                        Some(_) => {}
                        None => {
                            first.insert(t.clone(), (r.attempt.clone(), i));
                        }
                    }
                }
            }
            if !full {
                continue;
            }
            let mut sum = (0, 0);
            for r in records.iter().flat_map(|rec| rec.results.values()) {
                let c = r.report.counts();
                sum = (sum.0 + c.passes(), sum.1 + c.failures());
            }
            let stats = crate::eval::stats(records.iter().copied(), &[]).all;
            if (stats.passed, stats.failed) != sum {
                return Err(format!(
                    "node {i}: /stats all {:?} is not the sum of its results {sum:?}",
                    (stats.passed, stats.failed)
                ));
            }
            if sum.0 < node.stats.0 || sum.1 < node.stats.1 {
                return Err(format!("node {i}: /stats all went down from {:?} to {sum:?}", node.stats));
            }
            node.stats = sum;
        }
        Ok(())
    }

    /// At the end, with every node healed and up: every evaluation finished everywhere, every
    /// task has a result on every node, and without failures the nodes hold the same results.
    fn check_end(&self) -> Result<(), String> {
        let reference = self.engine(0).ok_or("node 0 is down at the end")?;
        for id in &self.submitted {
            let want = reference.record(*id).ok_or_else(|| format!("node 0 lost evaluation {id}"))?;
            for (i, n) in self.nodes.iter().enumerate() {
                let e = n.engine.as_ref().ok_or_else(|| format!("node {i} is down at the end"))?;
                let rec = e.record(*id).ok_or_else(|| format!("node {i} lacks evaluation {id}"))?;
                if rec.end_time.is_none() {
                    let jobs: Vec<Vec<String>> = self
                        .nodes
                        .iter()
                        .map(|n| {
                            n.jobs
                                .iter()
                                .map(|j| j.task.task_id.to_string())
                                .chain(n.waiting.iter().map(|w| format!("wait:{}", w.0.task_id)))
                                .chain(n.engine.as_ref().map(|e| format!("undelivered:{}", e.undelivered())))
                                .collect()
                        })
                        .collect();
                    if std::env::var_os("CDT_SIM_TRACE").is_some() {
                        let peers: Vec<Vec<SocketAddr>> = (0..self.nodes.len())
                            .map(|j| self.sim.core(j).peers().map(|(_, a)| a).collect())
                            .collect();
                        eprintln!("peers {peers:?} partitioned {}", self.partitioned);
                        for (j, m) in self.nodes.iter().enumerate() {
                            if let Some(r) = m.engine.as_ref().and_then(|e| e.record(*id)) {
                                let left = r.unfinished_tasks();
                                eprintln!(
                                    "node {j}: resp {} term {} v {} left {left:?} running {:?} deaths {:?} end {:?}",
                                    r.responsible, r.term, r.version, r.running, r.worker_deaths, r.end_time
                                );
                            }
                        }
                    }
                    return Err(format!(
                        "evaluation {id} unfinished on node {i}: {} tasks left, running {:?}, responsible {} term {}, jobs {jobs:?}",
                        rec.unfinished_tasks().len(),
                        rec.running,
                        rec.responsible,
                        rec.term
                    ));
                }
                let keys: BTreeSet<&TaskId> = rec.results.keys().collect();
                if keys != want.results.keys().collect() {
                    return Err(format!("nodes 0 and {i} hold results of different tasks of {id}"));
                }
                // Exactly one accepted result per task: every node holds the same ones.
                if rec.results != want.results {
                    let diff: Vec<(&TaskId, &str, &str)> = rec
                        .results
                        .iter()
                        .filter(|(t, r)| want.results.get(*t) != Some(*r))
                        .map(|(t, r)| {
                            (t, r.attempt.as_str(), want.results.get(t).map_or("", |w| w.attempt.as_str()))
                        })
                        .collect();
                    return Err(format!("nodes 0 and {i} hold different results for {id}: {diff:?}"));
                }
            }
        }
        Ok(())
    }
}

/// A project name without the `_<n>` suffix that made it unique.
fn strip_suffix(name: &str) -> String {
    match name.rsplit_once('_') {
        Some((base, n)) if n.parse::<u32>().is_ok() => base.to_string(),
        _ => name.to_string(),
    }
}

fn modules(rng: &mut StdRng) -> Vec<(String, Behaviour)> {
    if rng.random_bool(0.05) {
        return Vec::new();
    }
    (0..rng.random_range(1..=8))
        .map(|m| {
            let roll: f64 = rng.random();
            let b = if roll < 0.03 {
                Behaviour::Crash
            } else if roll < 0.07 {
                Behaviour::InfraError
            } else if roll < 0.10 {
                Behaviour::Hang
            } else {
                Behaviour::Tests {
                    passed: rng.random_range(0..6),
                    failed: rng.random_range(0..3),
                    ms: rng.random_range(50..2_000),
                }
            };
            (format!("tests/test_{m}.py"), b)
        })
        .collect()
}

fn report(module: &str, passed: u8, failed: u8, ms: u64) -> ModuleReport {
    let test = |k: u8, outcome| TestResult {
        nodeid: format!("{module}::t{k}"),
        outcome,
        duration: 0.01,
        message: None,
        attempts: Vec::new(),
    };
    let tests = (0..passed)
        .map(|k| test(k, Outcome::Passed))
        .chain((0..failed).map(|k| test(100 + k, Outcome::Failed)))
        .collect();
    ModuleReport {
        module: module.into(),
        tests,
        duration: ms as f64 / 1000.0,
        note: None,
        output: None,
        output_truncated: false,
    }
}

fn timeout_report(module: &str) -> ModuleReport {
    let t = TestResult {
        nodeid: module.into(),
        outcome: Outcome::Timeout,
        duration: 4.0,
        message: Some("timed out".into()),
        attempts: Vec::new(),
    };
    ModuleReport {
        module: module.into(),
        tests: vec![t],
        duration: 4.0,
        note: Some("timed out".into()),
        output: None,
        output_truncated: false,
    }
}

fn post(i: usize, task: &Task, outcome: Result<ModuleReport, String>, now: u64) -> TaskPost {
    let attempt = format!("n{i}-{now}-{}", task.task_id);
    TaskPost::new(addr(i), task.eval, &task.task_id, outcome, attempt)
}

/// What the store keeps of a persisted record: the latest header and every result written.
fn persist(records: &mut BTreeMap<EvalId, EvalRecord>, rec: EvalRecord) {
    let results = match records.remove(&rec.id) {
        Some(old) => old.results,
        None => BTreeMap::new(),
    };
    let mut stored = rec.clone_header();
    stored.results = results;
    for (t, r) in rec.results {
        stored.results.insert(t, r);
    }
    records.insert(stored.id, stored);
}

fn scenario(seed: u64) -> Scenario {
    Scenario {
        seed,
        nodes: 5,
        evaluations: 3,
        loss: 0.05,
        duplicate: 0.05,
        faults: true,
        partitions: true,
        bug: None,
    }
}

#[test]
fn one_seed_without_faults_finishes_every_evaluation_identically_everywhere() {
    let sc = Scenario { faults: false, partitions: false, ..scenario(1) };
    World::new(sc).run().unwrap_or_else(|e| panic!("{e}"));
}

/// Runs seeds `1..=count` on every core; returns the failures.
fn run_seeds(count: u64, make: impl Fn(u64) -> Scenario + Sync) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let mut failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let make = &make;
                s.spawn(move || {
                    (1..=count)
                        .filter(|seed| seed % threads == t)
                        .filter_map(|seed| World::new(make(seed)).run().err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec!["a simulation thread panicked".into()]))
            .collect()
    });
    failures.sort();
    failures
}

/// Seeds to run: `CDT_SIM_SEEDS`, or `default`.
fn seed_count(default: u64) -> u64 {
    std::env::var("CDT_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Kills with restarts and (in about four seeds of ten) a partition that cuts one node off.
#[test]
fn many_seeds_of_five_node_clusters_with_kills_restarts_and_partitions_keep_the_invariants() {
    if let Some(seed) = std::env::var("CDT_SIM_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        return World::new(scenario(seed)).run().unwrap_or_else(|e| panic!("{e}"));
    }
    let seeds = seed_count(1000);
    let failures = run_seeds(seeds, scenario);
    let partitioned = failures.len();
    assert!(failures.is_empty(), "{partitioned} of {seeds} seeds failed:\n{}", failures.join("\n"));
}

#[test]
fn an_injected_bug_accepting_a_second_result_is_caught() {
    let caught = (1..=50).find_map(|s| {
        let sc = Scenario { bug: Some(super::Bug::AcceptSecondResult), ..scenario(s) };
        World::new(sc).run().err()
    });
    let msg = caught.expect("the invariants catch a second accepted result within 50 seeds");
    assert!(msg.starts_with("seed "), "{msg}");
    assert!(msg.contains("accepted") || msg.contains("replaced"), "{msg}");
}
