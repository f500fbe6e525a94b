//! The application layer plugged into the protocol core ([`crate::core`]): the node's shell
//! around the evaluation [`Engine`] (see [`crate::engine`] for roles and rules).
//!
//! The engine decides; this shell does the I/O it asks for: it persists records (redb), runs
//! discovery and tasks with the runners on blocking threads, sends task messages through the UDP
//! core, delivers results and replicates records over HTTP, and feeds what happens back in.
//!
//! # Replication and durability
//! Every node holds a copy of every [`EvalRecord`] (persisted in redb). Changes are pushed to all
//! members over HTTP (`POST /internal/replicate`) and a periodic anti-entropy exchange
//! (`POST /internal/sync`, digests then records) repairs whatever a push missed (a restart, a
//! late joiner). Project archives are prefetched by every node when it first sees a project, so
//! a node that takes over an evaluation can serve its projects. Records merge as a grow-only
//! union (see [`crate::eval`]), so no accepted result is lost or counted twice.

mod lifecycle;
mod local;
mod project;
mod reference;
mod reference_owner;
mod reference_workers;
mod sync;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cdtester_config::Config;
use cdtester_plugins::{PolicySet, RunnerChoice};
use cdtester_runner_api::plan::ModuleStat;
use cdtester_runner_api::{Outcome, PreparedProject, Runner, TestResult};

use crate::core::{Event, LocalEvent, Snapshot};
use crate::engine::{Accepted, Action, Engine, EngineConfig, Input, Now, Refusal};
use crate::eval::{self, EvalRecord, ProjectRecord, ProjectState};
use crate::fetch::{self, FetchedProject};
use crate::ids::{EvalId, NodeAddr, ProjectId};
use crate::peer_http::auth::{Secret, Verifier};
use crate::peer_http::client::HttpClient;
use crate::store::Store;
use crate::wire::Message;

pub use crate::engine::{SyncRequest, SyncResponse, TaskPost};
pub use local::LocalNet;
pub use sync::Replicated;

/// Period of the engine's tick when nothing else happens.
const TICK: Duration = Duration::from_millis(100);
/// Ticks between two refreshes of the CACHE_UPDATE content the core sends periodically.
const CACHE_EVERY_TICKS: u64 = 10;

/// Accepts a module's result (`POST /task`) from the authenticated `caller`; the answer's
/// `status`.
pub async fn accept_result(
    app: &Arc<App>,
    post: TaskPost,
    caller: SocketAddr,
) -> Result<&'static str, AppError> {
    if let Some(status) = app.owned_result(&post, caller) {
        return Ok(status);
    }
    let post = app.translate_reference_post(post, caller);
    let answer = app.apply(Input::Result { post, caller }).answer;
    match answer {
        Some(Ok(a)) => Ok(a.as_str()),
        Some(Err(refusal)) => Err(refusal.into()),
        None => Err(AppError::Internal("the result was not answered".into())),
    }
}

/// Merges replicated records or deltas (`POST /internal/replicate`) sent by the authenticated
/// member `from`.
pub fn replicate(app: &Arc<App>, records: Vec<EvalRecord>, from: SocketAddr) -> Replicated {
    Replicated { merged: app.apply(Input::Merge { records, from }).merged }
}

/// Results delivered together by the authenticated member `caller` (`POST
/// /internal/results`): each is checked and answered exactly as a single `POST /task`.
pub fn accept_results(
    app: &Arc<App>,
    posts: Vec<TaskPost>,
    caller: SocketAddr,
) -> Vec<crate::engine::BatchAnswer> {
    let mut answers = Vec::with_capacity(posts.len());
    for post in posts {
        let outcome = app.apply(Input::Result { post: post.clone(), caller }).answer;
        let outcome =
            outcome.unwrap_or_else(|| Err(Refusal::Unavailable("the result was not answered".into())));
        answers.push(crate::engine::BatchAnswer::new(&post, &outcome));
    }
    answers
}

/// Takes a responsible member's proposal (`POST /internal/propose`) and answers with this
/// node's vote (its copy of the proposed tasks).
pub fn propose(app: &Arc<App>, copy: EvalRecord, from: SocketAddr) -> Result<crate::engine::Vote, AppError> {
    app.apply(Input::Propose { copy, from })
        .vote
        .ok_or_else(|| AppError::Forbidden("the proposal was refused".into()))
}

/// Answers a digest exchange (`POST /internal/sync`).
pub fn answer_sync(app: &App, req: &SyncRequest) -> SyncResponse {
    app.engine().answer_sync(req)
}

/// Finds a runner by the name configuration and policies use (or says why it cannot).
pub type RunnerLookup = Arc<dyn Fn(&str) -> Result<Arc<dyn Runner>, String> + Send + Sync>;

/// A runner lookup over a [`crate::registry::Registry`].
pub fn registry_lookup(registry: crate::registry::Registry) -> RunnerLookup {
    Arc::new(move |name: &str| registry.get(name).map_err(|e| e.to_string()))
}

/// How the application reaches the peer protocol (implemented by the UDP shell).
pub trait PeerNet: Send + Sync {
    /// Unicast an application message.
    fn send(&self, to: SocketAddr, msg: Message);
    /// Send an application message to every live peer.
    fn broadcast(&self, msg: Message);
    /// Send a CACHE_UPDATE now.
    fn push_cache(&self);
    /// Hand the core a value it needs ([`LocalEvent::SetCache`], [`LocalEvent::SetActive`]).
    fn push_state(&self, event: LocalEvent);
    /// Membership as the core sees it now.
    fn snapshot(&self) -> Snapshot;
    /// A live peer's HTTP API address, if the protocol carries it.
    fn peer_http(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let _ = peer;
        None
    }
}

/// A submission's fetch error for the client: the submission's faults as 400, this node's own
/// I/O failures (whose messages name host paths) logged and reported without detail.
pub fn intake_error(e: fetch::FetchError) -> AppError {
    if e.is_local() {
        tracing::error!("intake: {e}");
        AppError::Internal("storing the submission on this node failed".into())
    } else {
        AppError::BadRequest(e.to_string())
    }
}

/// Errors the HTTP layer turns into 4xx/5xx answers.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    TooLarge(String),
    /// The client is over its budget (`http::budget`).
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    Timeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Refusal> for AppError {
    fn from(r: Refusal) -> AppError {
        match r {
            Refusal::BadRequest(m) => AppError::BadRequest(m),
            Refusal::Forbidden(m) => AppError::Forbidden(m),
            Refusal::NotFound(m) => AppError::NotFound(m),
            Refusal::Unavailable(m) => AppError::Unavailable(m),
        }
    }
}

/// What a node is told at start.
#[derive(Clone)]
pub struct AppOptions {
    pub config: Config,
    /// This node's UDP address (its identity in the network).
    pub udp: SocketAddr,
    /// This node's HTTP API address.
    pub http: SocketAddr,
    pub runners: RunnerLookup,
    pub policies: PolicySet,
    /// One member in this process (`cdtester run`, see [`LocalNet`]): evaluations live in memory
    /// only and module durations are written in one transaction by [`App::finish_local`].
    pub local: bool,
}

/// The shell's own caches (the evaluation state is the engine's).
#[derive(Default)]
struct ShellState {
    /// Known HTTP addresses of peers, by UDP address.
    peers_http: HashMap<SocketAddr, SocketAddr>,
    /// Blobs being downloaded.
    fetching: HashSet<String>,
    /// Grades of finished projects (policies may be costly; a finished project's results no
    /// longer change).
    grades: HashMap<ProjectId, Option<f64>>,
    /// Peers to run a digest exchange with soon (they may know evaluations this node lacks).
    sync_hints: BTreeSet<SocketAddr>,
    /// This node's runner decision per project id (see [`App::choose_runner`]), made once for
    /// discovery and every task; dropped when no unfinished evaluation holds the project.
    choices: HashMap<ProjectId, (RunnerChoice, cdtester_config::ProjectSettings)>,
    /// The modules a rerun runs, by project id (discovery leaves the others out).
    rerun_only: HashMap<ProjectId, BTreeSet<String>>,
    /// Project folders of this machine by content hash (`cdtester run`: no archive, no copy).
    local_roots: HashMap<String, PathBuf>,
    /// Module durations not written yet (a local app writes them in [`App::finish_local`]).
    durations: Vec<(String, ModuleStat)>,
}

/// Prepared projects by (content hash, runner), shared by the worker slots.
type PreparedMap = HashMap<(String, String), Arc<tokio::sync::Mutex<Option<PreparedProject>>>>;

/// What executing the engine's actions produced for the caller.
#[derive(Default)]
struct Applied {
    answer: Option<Result<Accepted, Refusal>>,
    replicate: Vec<EvalRecord>,
    /// Records an [`Input::Merge`] changed.
    merged: usize,
    /// The vote answering an [`Input::Propose`].
    vote: Option<crate::engine::Vote>,
}

/// The application state of one node.
pub struct App {
    cfg: Config,
    udp: SocketAddr,
    http: SocketAddr,
    store: Store,
    engine: Mutex<Engine>,
    shell: Mutex<ShellState>,
    net: OnceLock<Arc<dyn PeerNet>>,
    runners: RunnerLookup,
    policies: PolicySet,
    client: HttpClient,
    verifier: Verifier,
    prepared: Mutex<PreparedMap>,
    work_dir: PathBuf,
    projects_dir: PathBuf,
    /// Host paths clients must not see in errors, longest first, with their placeholders.
    redactions: Vec<(String, &'static str)>,
    intake: fetch::IntakeSlots,
    /// See [`AppOptions::local`].
    local: bool,
    /// Bumped at every record change (waiters use it instead of polling).
    changes: tokio::sync::watch::Sender<u64>,
    /// Discoveries (preparation and collection) running at once: at most `runner.workers` in a
    /// local app (as many pytest processes as slots), unbounded on a node.
    discoveries: tokio::sync::Semaphore,
    /// Work of reference-implementation nodes (see [`reference`]).
    reference: Mutex<reference::RefState>,
}

fn now() -> Now {
    Now { mono: Instant::now(), wall: eval::now_secs() }
}

impl App {
    /// Opens the store in the configured data directory and loads every stored evaluation and
    /// the remembered module durations into the engine.
    pub fn open(opts: AppOptions) -> anyhow::Result<Arc<App>> {
        use anyhow::Context;
        let data = opts.config.node.data_dir.clone();
        let store = Store::open(&data).with_context(|| format!("opening the store in {}", data.display()))?;
        let work_dir = data.join("work");
        let projects_dir = data.join("projects");
        for d in [&work_dir, &projects_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let records = if opts.local {
            Vec::new()
        } else {
            store.load_evaluations().context("loading stored evaluations")?
        };
        let durations: HashMap<String, ModuleStat> =
            store.all_durations().context("loading remembered durations")?.into_iter().collect();
        // A local app is a network of one: it has no members to remember.
        let members =
            if opts.local { Vec::new() } else { store.members().context("loading remembered members")? };
        tracing::info!(evaluations = records.len(), members = members.len(), "store loaded");
        let secret = Secret::new(opts.config.node.secret.as_deref());
        let timers = &opts.config.timers;
        let engine_cfg = EngineConfig {
            me: opts.udp,
            http_port: opts.http.port(),
            slots: opts.config.runner.workers,
            confirm_timeout: Duration::from_millis(timers.confirm_timeout_ms),
            announce_every: Duration::from_millis(timers.task_announce_ms),
            hold: Duration::from_millis(timers.failure_timeout_ms.saturating_mul(2)),
            open: !secret.is_set(),
            quorum_hold: Duration::from_millis(timers.quorum_hold_ms),
        };
        let app = App {
            client: HttpClient::new(secret.clone(), Some(opts.udp.to_string())),
            verifier: Verifier::new(secret),
            udp: opts.udp,
            http: opts.http,
            store,
            engine: Mutex::new(Engine::new(engine_cfg, records, durations, members, Instant::now())),
            shell: Mutex::new(ShellState::default()),
            net: OnceLock::new(),
            runners: opts.runners,
            policies: opts.policies,
            prepared: Mutex::new(HashMap::new()),
            work_dir,
            projects_dir,
            redactions: redactions(&opts.config),
            intake: fetch::IntakeSlots::new(&opts.config.intake),
            local: opts.local,
            changes: tokio::sync::watch::channel(0).0,
            discoveries: tokio::sync::Semaphore::new(if opts.local {
                opts.config.runner.workers.max(1)
            } else {
                tokio::sync::Semaphore::MAX_PERMITS
            }),
            reference: Mutex::default(),
            cfg: opts.config,
        };
        Ok(Arc::new(app))
    }

    /// Connects the application to the peer protocol and starts its background loops.
    pub fn start(self: &Arc<Self>, net: Arc<dyn PeerNet>) {
        if self.net.set(net).is_err() {
            tracing::warn!("application already started");
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let mut ticks: u64 = 0;
            loop {
                app.refresh_members();
                app.apply(Input::Tick);
                app.push_active();
                if ticks.is_multiple_of(CACHE_EVERY_TICKS) {
                    app.announce_to_reference();
                    app.reference_owner_tick();
                    app.set_cache();
                }
                ticks += 1;
                tokio::time::sleep(TICK).await;
            }
        });
        tokio::spawn(sync::run(self.clone()));
        tokio::spawn(lifecycle::run(self.clone()));
    }

    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shell(&self) -> MutexGuard<'_, ShellState> {
        self.shell.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prepared_map(&self) -> MutexGuard<'_, PreparedMap> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn net(&self) -> Option<&Arc<dyn PeerNet>> {
        self.net.get()
    }

    /// Feeds one input to the engine and does what it asks (the engine's lock is not held
    /// while doing it).
    fn apply(self: &Arc<Self>, input: Input) -> Applied {
        let actions = self.engine().handle(now(), input);
        self.execute(actions)
    }

    fn execute(self: &Arc<Self>, actions: Vec<Action>) -> Applied {
        let mut applied = Applied::default();
        for action in actions {
            match action {
                Action::Persist(rec) => {
                    if !self.local {
                        self.persist(&rec);
                    }
                    self.changes.send_modify(|v| *v = v.wrapping_add(1));
                }
                Action::Merged(n) => applied.merged = n,
                Action::Discover { eval, project } => self.spawn_discovery(eval, project),
                Action::Run(task) => {
                    tokio::spawn(worker::run(self.clone(), task));
                }
                Action::Send { to, msg } => self.net().inspect(|n| n.send(to, msg)).map_or((), |_| ()),
                Action::Broadcast(msg) => self.net().inspect(|n| n.broadcast(msg)).map_or((), |_| ()),
                Action::DeliverBatch { to, posts } => {
                    tokio::spawn(worker::deliver_batch(self.clone(), to, posts));
                }
                Action::Answer(a) => applied.answer = Some(a),
                Action::PushCache => self.push_cache(),
                Action::Prefetch { project, from } => self.prefetch(project, from),
                Action::RememberDuration { key, stat } if self.local => {
                    self.shell().durations.push((key, stat));
                }
                Action::RememberDuration { key, stat } => {
                    if let Err(e) = self.store.record_durations(&[(key, stat)]) {
                        tracing::warn!("remembering the module duration: {e}");
                    }
                }
                Action::RememberMembers(members) => {
                    if let Err(e) = self.store.remember_members(&members) {
                        tracing::warn!("remembering the members: {e}");
                    }
                }
                Action::Replicate(records) => applied.replicate.extend(records),
                Action::Propose { to, copy } => {
                    tokio::spawn(sync::propose(self.clone(), to, copy));
                }
                Action::Vote(copy) => applied.vote = Some(copy),
            }
        }
        applied
    }

    /// Hands the core the active evaluations of every responsible node (for elections; a
    /// local app has no core).
    fn push_active(&self) {
        if let Some(net) = self.net().filter(|_| !self.local) {
            let mut active = self.engine().active_evaluations();
            self.ref_state().view.active(&mut active);
            net.push_state(LocalEvent::SetActive(active));
        }
    }

    /// Hands the core this node's current evaluation summary for its CACHE_UPDATEs (a local app
    /// has no core).
    fn set_cache(&self) {
        if let Some(net) = self.net().filter(|_| !self.local) {
            let mut content = self.engine().cache_content();
            App::reference_names(&mut content);
            self.ref_state().view.add_owned(&self.addr().to_string(), &mut content);
            net.push_state(LocalEvent::SetCache(Box::new(content)));
        }
    }

    /// Sends a CACHE_UPDATE with the current summary now.
    fn push_cache(&self) {
        self.set_cache();
        if let Some(net) = self.net() {
            net.push_cache();
        }
    }

    /// Tells the engine the membership the core sees now.
    fn refresh_members(self: &Arc<Self>) {
        let Some(net) = self.net() else { return };
        let snap = net.snapshot();
        let peers = snap.peers.values().filter_map(|a| a.parse().ok()).collect();
        // Peers that advertise an HTTP API are cdtester nodes: they vote (see engine::quorum).
        let voters = snap.http.keys().filter_map(|a| a.parse().ok()).collect();
        self.apply(Input::Voters(voters));
        self.apply(Input::Members { id: snap.id, peers });
    }

    /// This node's UDP address string (`ip:port`).
    pub fn addr(&self) -> NodeAddr {
        NodeAddr::from(self.udp)
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// Checks the signatures of internal calls (and remembers their nonces).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The intake limits (what HTTP clients may send).
    pub fn intake(&self) -> &cdtester_config::IntakeConfig {
        &self.cfg.intake
    }

    /// A new upload file in the work folder, holding an upload slot (503 when none is free).
    pub fn new_upload(&self) -> Result<fetch::Upload, AppError> {
        let slot = self.intake.upload_slot().ok_or_else(|| {
            AppError::Unavailable("too many uploads in progress on this node; retry later".into())
        })?;
        fetch::Upload::create(&self.work_dir, slot).map_err(intake_error)
    }

    /// Live members now (own address first), as `ip:port` strings.
    pub fn members(&self) -> Vec<String> {
        let me = self.addr().to_string();
        let mut out = vec![me.clone()];
        if let Some(net) = self.net() {
            out.extend(net.snapshot().peers.into_values().filter(|a| *a != me));
        }
        out
    }

    /// Whether `addr` is this node or a live peer.
    pub fn is_member(&self, addr: SocketAddr) -> bool {
        self.members().contains(&addr.to_string())
    }

    /// The HTTP address of a node, by its UDP address.
    fn http_of(&self, udp: SocketAddr) -> Option<SocketAddr> {
        if udp == self.udp {
            return Some(self.http);
        }
        if let Some(a) = self.net().and_then(|n| n.peer_http(udp)) {
            return Some(a);
        }
        self.shell().peers_http.get(&udp).copied()
    }

    fn learn_http(&self, udp: SocketAddr, http: SocketAddr) {
        if udp != self.udp {
            self.shell().peers_http.insert(udp, http);
        }
    }

    // ------------------------------------------------------------------ submissions

    /// Registers an evaluation of already fetched projects; discovery continues in the
    /// background. Returns its id.
    pub async fn submit(self: &Arc<Self>, fetched: Vec<FetchedProject>) -> Result<EvalId, AppError> {
        self.submit_only(fetched, Vec::new(), None).await
    }

    /// [`App::submit`], running only the modules `only` names for each project that has
    /// `Some` there (a rerun of evaluation `rerun_of`; see `http::rerun`).
    pub async fn submit_only(
        self: &Arc<Self>,
        fetched: Vec<FetchedProject>,
        only: Vec<Option<BTreeSet<String>>>,
        rerun_of: Option<EvalId>,
    ) -> Result<EvalId, AppError> {
        if fetched.is_empty() {
            return Err(AppError::BadRequest("the submission holds no project".into()));
        }
        for p in &fetched {
            self.store.put_blob(&p.sha256, &p.archive).map_err(|e| AppError::Internal(e.to_string()))?;
        }
        let projects = fetched.into_iter().map(|p| (p.name, p.url, p.sha256)).collect();
        Ok(self.register(projects, only, rerun_of).await)
    }

    /// Registers an evaluation of projects (name, URL, content hash) whose content this node
    /// holds (a rerun of `rerun_of` when set), replicates it and starts their discovery.
    async fn register(
        self: &Arc<Self>,
        projects: Vec<(String, Option<String>, String)>,
        only: Vec<Option<BTreeSet<String>>>,
        rerun_of: Option<EvalId>,
    ) -> EvalId {
        let rec = {
            let engine = self.engine();
            let id = loop {
                let id = EvalId::random();
                if !engine.knows(id) {
                    break id;
                }
            };
            let projects = projects
                .into_iter()
                .enumerate()
                .map(|(i, (name, url, content_hash))| ProjectRecord {
                    id: ProjectId::of(id, i),
                    name,
                    url,
                    content_hash,
                    state: ProjectState::Preparing,
                })
                .collect();
            let mut rec = EvalRecord::new(id, self.addr(), eval::now_secs(), projects);
            rec.rerun_of = rerun_of;
            eval::unique_names(&mut rec.projects);
            rec
        };
        {
            let mut shell = self.shell();
            for (p, modules) in rec.projects.iter().zip(only) {
                if let Some(m) = modules {
                    shell.rerun_only.insert(p.id.clone(), m);
                }
            }
        }
        tracing::info!(eval = %rec.id, projects = rec.projects.len(), "evaluation submitted");
        self.apply(Input::Submitted(rec.clone()));
        // Replicate before answering, so that the evaluation survives this node's failure.
        sync::push_now(self, std::slice::from_ref(&rec)).await;
        rec.id
    }

    /// Fetches git repositories (blocking clones on a worker thread, under the intake's URL
    /// policy, deadline, caps and clone slots) and submits them.
    pub async fn submit_urls(
        self: &Arc<Self>,
        token: Option<String>,
        urls: Vec<String>,
        names: Vec<Option<String>>,
    ) -> Result<EvalId, AppError> {
        let intake = &self.cfg.intake;
        fetch::UrlPolicy::from_config(intake)
            .check_all(&urls)
            .map_err(|e| AppError::BadRequest(e.to_string()))?;
        let slot = self.intake.clone_slot().ok_or_else(|| {
            AppError::Unavailable("too many clones in progress on this node; retry later".into())
        })?;
        let timeout = Duration::from_secs(intake.clone_timeout_s);
        let limits = fetch::CloneLimits::from_config(intake, Instant::now() + timeout);
        let work = self.work_dir.clone();
        // The slot stays taken until the clones have really stopped, even after the answer.
        let clones = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let mut out = Vec::new();
            let mut errors = Vec::new();
            for (i, url) in urls.iter().enumerate() {
                match fetch::fetch_git(url, token.as_deref(), &work, &limits).map_err(intake_error) {
                    Ok(p) => out.push(fetch::FetchedProject {
                        name: names.get(i).cloned().flatten().unwrap_or(p.name),
                        ..p
                    }),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if errors.is_empty() { Ok(out) } else { Err(errors.join("; ")) }
        });
        let fetched = tokio::time::timeout(timeout, clones)
            .await
            .map_err(|_| {
                AppError::Unprocessable(format!(
                    "cloning did not finish within {} s (intake.clone_timeout_s)",
                    timeout.as_secs()
                ))
            })?
            .map_err(|e| AppError::Internal(e.to_string()))?
            .map_err(|e| AppError::Unprocessable(self.redact(&e)))?;
        self.submit(fetched).await
    }

    /// Splits an uploaded zip into projects (safe extraction under the intake caps, holding the
    /// upload's slot) and submits them.
    pub async fn submit_zip(self: &Arc<Self>, upload: fetch::Upload) -> Result<EvalId, AppError> {
        let work = self.work_dir.clone();
        let caps = crate::archive::Caps::from_config(&self.cfg.intake);
        let fetched =
            tokio::task::spawn_blocking(move || fetch::projects_from_zip(upload.path(), &work, caps))
                .await
                .map_err(|e| AppError::Internal(e.to_string()))?
                .map_err(|e| AppError::BadRequest(self.redact(&e.to_string())))?;
        self.submit(fetched).await
    }

    /// `msg` with this node's host paths (data directory, environments, temp and home folders)
    /// replaced by placeholders: what clients and peers see of errors.
    pub fn redact(&self, msg: &str) -> String {
        let mut out = msg.to_string();
        for (path, placeholder) in &self.redactions {
            out = out.replace(path.as_str(), placeholder);
        }
        out
    }

    /// Persists a record's header and the results it carries (a delta holds only new ones).
    fn persist(&self, rec: &EvalRecord) {
        if let Err(e) = self.store.put_evaluation(rec, rec.results.keys()) {
            tracing::error!(eval = %rec.id, "persisting the evaluation failed: {e}");
        }
    }

    // ------------------------------------------------------------------ queries

    /// Every evaluation id this node knows (the network's, by replication), oldest first.
    pub fn list(&self) -> Vec<EvalId> {
        self.engine().list()
    }

    /// The full record of an evaluation.
    pub fn record(&self, id: EvalId) -> Option<EvalRecord> {
        self.engine().record(id).cloned()
    }

    /// The report of an evaluation (with per-test results when `with_tests`).
    pub fn report(&self, id: EvalId, with_tests: bool) -> Option<eval::EvalReport> {
        let (rec, reruns) = {
            let engine = self.engine();
            let rec = engine.record(id)?.clone();
            (rec, engine.records().filter(|r| r.rerun_of == Some(id)).map(|r| r.id).collect::<Vec<_>>())
        };
        let grade = |p: &ProjectRecord, tests: &[TestResult]| self.grade(p, tests);
        let mut report = eval::build_report(&rec, eval::now_secs(), with_tests, &grade);
        report.reruns = reruns;
        report.reruns.sort_unstable();
        Some(report)
    }

    /// A finished project's grade: its grading policies' or the default, flaky tests counted
    /// as passes or failures as `grading.flaky` says (policies see them so, attempts included).
    fn grade(&self, p: &ProjectRecord, tests: &[TestResult]) -> Option<f64> {
        if let Some(g) = self.shell().grades.get(&p.id) {
            return *g;
        }
        let policies = match &p.state {
            ProjectState::Ready { policies, .. } => policies.as_slice(),
            _ => &[],
        };
        let as_outcome = match self.cfg.grading.flaky {
            cdtester_config::FlakyGrade::Pass => Outcome::Passed,
            cdtester_config::FlakyGrade::Fail => Outcome::Failed,
        };
        let graded: Vec<TestResult> = tests
            .iter()
            .map(|t| match t.outcome {
                Outcome::Flaky => TestResult { outcome: as_outcome, ..t.clone() },
                _ => t.clone(),
            })
            .collect();
        let g = self.policies.grade(policies, &p.name, &graded).value;
        self.shell().grades.insert(p.id.clone(), g);
        g
    }

    /// The recent runs of each test of the projects named `project` (`GET /history/{project}`).
    pub fn history(&self, project: &str) -> Result<Vec<(String, Vec<crate::store::TestRun>)>, AppError> {
        self.store.history(project).map_err(|e| {
            tracing::error!("reading the test history: {e}");
            AppError::Internal("reading the test history failed".into())
        })
    }

    /// `/stats`.
    pub fn stats(&self) -> eval::Stats {
        let members = self.members();
        let mut stats = eval::stats(self.engine().records(), &members);
        self.add_reference_stats(&mut stats);
        stats
    }

    /// `/network`.
    pub fn network(&self) -> BTreeMap<String, Vec<String>> {
        match self.net() {
            Some(net) => net.snapshot().network,
            None => BTreeMap::from([(self.addr().to_string(), Vec::new())]),
        }
    }

    /// The archive of a project, with its sha256 (`GET /file/<project id>`).
    pub fn project_file(&self, project_id: &str) -> Result<(String, Vec<u8>), AppError> {
        let id = project_id.parse::<ProjectId>().map_err(|_| AppError::NotFound("File not found".into()))?;
        let hash = self.engine().project(&id).map(|(_, p)| p.content_hash.clone());
        let Some(hash) = hash else { return Err(AppError::NotFound("File not found".into())) };
        match self.store.read_blob(&hash) {
            Ok(bytes) => Ok((hash, bytes)),
            Err(_) => Err(AppError::NotFound("File not found (archive not on this node yet)".into())),
        }
    }

    // ------------------------------------------------------------------ core events

    /// Handles one event from the protocol core.
    pub fn on_event(self: &Arc<Self>, event: Event) {
        match event {
            Event::App { from, msg, .. } => self.on_message(from, msg),
            Event::PeerDown { addr, reason, .. } => {
                tracing::info!(peer = %addr, ?reason, "peer down: requeueing its tasks");
                if reason == crate::core::DownReason::Failed {
                    crate::metrics::node().failure_detected()
                }
                self.refresh_members();
                self.apply(Input::PeerDown { addr, died: reason == crate::core::DownReason::Failed });
            }
            Event::TakeOver { failed_addr, evaluations, .. } => {
                crate::metrics::node().election_won();
                self.apply(Input::TakeOver { failed: failed_addr });
                self.take_over_reference(failed_addr, &evaluations);
            }
            Event::Relinquish { failed_addr, owner, .. } => {
                crate::metrics::node().election_relinquished();
                tracing::info!(failed = %failed_addr, %owner, "another node owns the failed node's evaluations");
            }
            Event::CacheUpdate { from, data } => {
                self.reference_cache(&data.content);
                let unknown = {
                    let engine = self.engine();
                    data.content
                        .evaluations
                        .keys()
                        .filter_map(|k| k.parse::<EvalId>().ok())
                        .any(|id| !engine.knows(id))
                };
                if unknown {
                    self.shell().sync_hints.insert(from);
                }
            }
            Event::PeerUp { id, addr } => {
                self.refresh_members();
                self.apply(Input::PeerUp { id, addr });
                self.shell().sync_hints.insert(addr);
            }
            Event::Joined { .. } | Event::Left => {}
        }
    }

    fn on_message(self: &Arc<Self>, from: SocketAddr, msg: Message) {
        if self.reference_message(from, &msg) {
            return;
        }
        match &msg {
            Message::TaskSend(data) => {
                if let Ok(port) = data.info.api_port.parse::<u16>() {
                    self.learn_http(from, SocketAddr::new(from.ip(), port));
                }
            }
            Message::ProjectAnnounce(data) => {
                if let Ok(port) = data.api_port.parse::<u16>() {
                    self.learn_http(from, SocketAddr::new(from.ip(), port));
                }
                self.shell().sync_hints.insert(from);
                return;
            }
            Message::EvaluationResponsibilityUpdate(data) => {
                tracing::debug!(project = %data.project_id, node = %data.new_node, "responsibility update");
                if let Ok(addr) = data.new_node.parse() {
                    self.shell().sync_hints.insert(addr);
                }
                return;
            }
            Message::TaskAnnounce(_) | Message::TaskRequest(_) | Message::TaskConfirm(_) => {}
            other => {
                tracing::debug!(cmd = other.cmd(), %from, "ignoring message");
                return;
            }
        }
        self.apply(Input::Message { from, msg });
    }
}

/// The host paths [`App::redact`] hides, longest first.
fn redactions(cfg: &Config) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = Vec::new();
    let mut add = |p: &std::path::Path, placeholder: &'static str| {
        for form in [Some(p.to_path_buf()), std::fs::canonicalize(p).ok(), std::path::absolute(p).ok()] {
            let Some(s) = form.map(|f| f.to_string_lossy().into_owned()) else { continue };
            if s.len() > 1 && !out.iter().any(|(o, _)| *o == s) {
                out.push((s, placeholder));
            }
        }
    };
    add(&cfg.node.data_dir, "<data>");
    if let Some(v) = &cfg.runner.local.venv_dir {
        add(v, "<venvs>");
    }
    add(&std::env::temp_dir(), "<tmp>");
    if let Some(home) = std::env::var_os("HOME") {
        add(std::path::Path::new(&home), "<home>");
    }
    out.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    out
}
