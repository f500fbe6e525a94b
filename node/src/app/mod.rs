//! The application layer plugged into the protocol core ([`crate::core`]): evaluations,
//! task distribution, results, replication and recovery takeover.
//!
//! # Roles
//! - **Responsible node** of an evaluation (first the node that accepted the submission, after a
//!   failure the node the core elects): discovers each project's modules, keeps the queue of
//!   unfinished tasks (longest first, by durations remembered in the store), runs tasks on its own
//!   free worker slots and hands the rest out by the pull protocol (TASK_ANNOUNCE -> TASK_REQUEST
//!   -> TASK_SEND -> TASK_CONFIRM), accepts results (`POST /task`), and requeues tasks whose
//!   worker did not confirm in time, failed, or overran its lease.
//! - **Worker** (every node, the responsible one too): with a free slot, asks announcers for work,
//!   fetches the project archive (`GET /file/<project id>`, sha256-checked, cached per node by
//!   content hash), prepares it with the project's runner, runs the module and delivers the result
//!   to whichever node is responsible *at delivery time*, retrying until accepted.
//!
//! # Replication and durability
//! Every node holds a copy of every [`EvalRecord`] (persisted in redb). Changes are pushed to all
//! members over HTTP (`POST /internal/replicate`) and a periodic anti-entropy exchange
//! (`POST /internal/sync`, digests then records) repairs whatever a push missed (a restart, a
//! late joiner). Project archives are prefetched by every node when it first sees a project, so
//! a node that takes over an evaluation can serve its projects. Records merge as a grow-only
//! union (see [`crate::eval`]), so no accepted result is lost or counted twice.

mod lifecycle;
mod run;
mod sched;
mod sync;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cdtester_config::Config;
use cdtester_plugins::{PolicySet, ProjectMeta, RunnerChoice};
use cdtester_runner_api::{PreparedProject, ProjectSource, Runner, TestResult};
use cdtester_runners::local::{DurationStore, ModuleStat};
use tokio::sync::{Notify, Semaphore};

use crate::core::{AppState, Event, Snapshot};
use crate::eval::{self, EvalId, EvalRecord, MAX_EVAL_ID, ModuleResult, ProjectRecord, ProjectState};
use crate::fetch::{self, FetchedProject};
use crate::http::auth::{Secret, Verifier};
use crate::http::client::HttpClient;
use crate::store::Store;
use crate::wire::{self, CacheContent, EvalMap, Message};

pub use run::{node_main, run_node, runners_for};
pub use sync::{Replicated, SyncRequest, SyncResponse};
pub use worker::TaskPost;

/// Accepts a module's result (`POST /task`) from the authenticated `caller`; the answer's
/// `status`.
pub async fn accept_result(
    app: &Arc<App>,
    post: TaskPost,
    caller: SocketAddr,
) -> Result<&'static str, AppError> {
    sched::accept(app, post, caller).await.map(|a| a.as_str())
}

/// Merges replicated records or deltas (`POST /internal/replicate`) sent by the authenticated
/// member `from`.
pub fn replicate(app: &Arc<App>, records: Vec<EvalRecord>, from: SocketAddr) -> Replicated {
    Replicated { merged: sync::merge_records(app, records, from) }
}

/// Answers a digest exchange (`POST /internal/sync`).
pub fn answer_sync(app: &App, req: &SyncRequest) -> SyncResponse {
    sync::answer_sync(app, req)
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
    #[error("{0}")]
    Timeout(String),
    #[error("internal error: {0}")]
    Internal(String),
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
}

/// A task handed to a worker (or run here) and not finished yet.
#[derive(Debug, Clone)]
struct InFlight {
    eval: EvalId,
    worker: SocketAddr,
    confirmed: bool,
    since: Instant,
    deadline: Instant,
}

#[derive(Default)]
struct State {
    evals: BTreeMap<EvalId, EvalRecord>,
    /// Tasks of evaluations this node is responsible for that are handed out.
    inflight: HashMap<String, InFlight>,
    /// Known HTTP addresses of peers, by UDP address.
    peers_http: HashMap<SocketAddr, SocketAddr>,
    /// Remembered module (seconds, tests) (cache of the store's table).
    durations: HashMap<String, Option<(f64, u64)>>,
    /// Records changed here and not yet pushed to peers, with the results added since.
    dirty: BTreeMap<EvalId, BTreeSet<String>>,
    /// Projects whose discovery runs on this node.
    discovering: HashSet<String>,
    /// Blobs being downloaded.
    fetching: HashSet<String>,
    /// Grades of finished projects (policies may be costly).
    grades: HashMap<String, Option<f64>>,
    /// When the next TASK_ANNOUNCE may go out.
    next_announce: Option<Instant>,
    /// Peers whose CACHE_UPDATE mentioned evaluations this node lacks: sync with them soon.
    sync_hints: BTreeSet<SocketAddr>,
    /// This node's runner decision per project id (see [`App::choose_runner`]), made once for
    /// discovery and every task; dropped when no unfinished evaluation holds the project.
    choices: HashMap<String, (RunnerChoice, cdtester_config::ProjectSettings)>,
    /// Runner failures per task (requeued until [`sched`]'s limit).
    task_failures: HashMap<String, u32>,
    /// Evaluations this node was responsible for before a restart: not scheduled until
    /// `resume_at`, so that a takeover that happened meanwhile is learnt from peers first.
    held: HashSet<EvalId>,
    resume_at: Option<Instant>,
    /// Nodes that announced work, and when (a worker asks them again as soon as a slot frees).
    announcers: HashMap<SocketAddr, Instant>,
    /// The modules a rerun runs, by project id (discovery leaves the others out).
    rerun_only: HashMap<String, BTreeSet<String>>,
}

/// Prepared projects by (content hash, runner), shared by the worker slots.
type PreparedMap = HashMap<(String, String), Arc<tokio::sync::Mutex<Option<PreparedProject>>>>;

/// The application state of one node.
pub struct App {
    cfg: Config,
    udp: SocketAddr,
    udp_s: String,
    http: SocketAddr,
    store: Store,
    state: Mutex<State>,
    net: OnceLock<Arc<dyn PeerNet>>,
    runners: RunnerLookup,
    policies: PolicySet,
    client: HttpClient,
    verifier: Verifier,
    slots: Arc<Semaphore>,
    wake: Notify,
    prepared: Mutex<PreparedMap>,
    work_dir: PathBuf,
    projects_dir: PathBuf,
    /// Host paths clients must not see in errors, longest first, with their placeholders.
    redactions: Vec<(String, &'static str)>,
    intake: fetch::IntakeSlots,
}

impl App {
    /// Opens the store in the configured data directory and loads every stored evaluation.
    pub fn open(opts: AppOptions) -> anyhow::Result<Arc<App>> {
        use anyhow::Context;
        let data = opts.config.node.data_dir.clone();
        let store = Store::open(&data).with_context(|| format!("opening the store in {}", data.display()))?;
        let work_dir = data.join("work");
        let projects_dir = data.join("projects");
        for d in [&work_dir, &projects_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut state = State::default();
        for rec in store.load_evaluations().context("loading stored evaluations")? {
            state.evals.insert(rec.id, rec);
        }
        tracing::info!(evaluations = state.evals.len(), "store loaded");
        let secret = Secret::new(opts.config.node.secret.as_deref());
        let udp_s = wire::addr_string(opts.udp);
        let app = App {
            slots: Arc::new(Semaphore::new(opts.config.runner.workers)),
            client: HttpClient::new(secret.clone(), Some(udp_s.clone())),
            verifier: Verifier::new(secret),
            udp: opts.udp,
            udp_s,
            http: opts.http,
            store,
            state: Mutex::new(state),
            net: OnceLock::new(),
            runners: opts.runners,
            policies: opts.policies,
            wake: Notify::new(),
            prepared: Mutex::new(HashMap::new()),
            work_dir,
            projects_dir,
            redactions: redactions(&opts.config),
            intake: fetch::IntakeSlots::new(&opts.config.intake),
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
        // Resume what this node was responsible for before a restart.
        let resume: Vec<(EvalId, Vec<String>)> = {
            let st = self.lock();
            st.evals
                .values()
                .filter(|r| r.responsible == self.udp_s && r.end_time.is_none())
                .map(|r| {
                    let preparing = r
                        .projects
                        .iter()
                        .filter(|p| matches!(p.state, ProjectState::Preparing))
                        .map(|p| p.id.clone())
                        .collect();
                    (r.id, preparing)
                })
                .collect()
        };
        if !resume.is_empty() {
            let hold = Duration::from_millis(self.cfg.timers.failure_timeout_ms.saturating_mul(2));
            let mut st = self.lock();
            st.held = resume.iter().map(|(id, _)| *id).collect();
            st.resume_at = Some(Instant::now() + hold);
        }
        let app = self.clone();
        tokio::spawn(async move {
            let Some(at) = app.lock().resume_at else { return };
            tokio::time::sleep_until(at.into()).await;
            let held = std::mem::take(&mut app.lock().held);
            for (id, preparing) in resume {
                let still_mine =
                    app.record(id).is_some_and(|r| r.responsible == app.udp_s && r.end_time.is_none());
                if !held.contains(&id) || !still_mine {
                    continue;
                }
                tracing::info!(eval = id, "resuming evaluation after restart");
                // Tasks this node ran when it stopped count a worker death; those running
                // elsewhere stay with their workers.
                sched::adopt_running(&app, id, app.udp);
                for pid in preparing {
                    app.spawn_discovery(id, pid);
                }
            }
            app.wake.notify_one();
        });
        tokio::spawn(sched::run(self.clone()));
        tokio::spawn(sync::run(self.clone()));
        tokio::spawn(lifecycle::run(self.clone()));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prepared_map(&self) -> MutexGuard<'_, PreparedMap> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn net(&self) -> Option<&Arc<dyn PeerNet>> {
        self.net.get()
    }

    /// This node's UDP address string (`ip:port`).
    pub fn addr(&self) -> &str {
        &self.udp_s
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
        let mut out = vec![self.udp_s.clone()];
        if let Some(net) = self.net() {
            out.extend(net.snapshot().peers.into_values().filter(|a| *a != self.udp_s));
        }
        out
    }

    /// Whether `addr` is this node or a live peer.
    pub fn is_member(&self, addr: SocketAddr) -> bool {
        let addr = wire::addr_string(addr);
        self.members().contains(&addr)
    }

    /// The HTTP address of a node, by its UDP address.
    fn http_of(&self, udp: SocketAddr) -> Option<SocketAddr> {
        if udp == self.udp {
            return Some(self.http);
        }
        if let Some(a) = self.net().and_then(|n| n.peer_http(udp)) {
            return Some(a);
        }
        self.lock().peers_http.get(&udp).copied()
    }

    fn learn_http(&self, udp: SocketAddr, http: SocketAddr) {
        if udp != self.udp {
            self.lock().peers_http.insert(udp, http);
        }
    }

    // ------------------------------------------------------------------ submissions

    /// A new evaluation id: random below 2^53, unused here.
    fn new_eval_id(&self, st: &State) -> EvalId {
        loop {
            let id = rand::random_range(1_000_000..MAX_EVAL_ID);
            if !st.evals.contains_key(&id) {
                return id;
            }
        }
    }

    /// Registers an evaluation of already fetched projects; discovery continues in the
    /// background. Returns its id.
    pub async fn submit(self: &Arc<Self>, fetched: Vec<FetchedProject>) -> Result<EvalId, AppError> {
        self.submit_only(fetched, Vec::new()).await
    }

    /// [`App::submit`], running only the modules `only` names for each project that has
    /// `Some` there (a rerun; see `http::rerun`).
    pub async fn submit_only(
        self: &Arc<Self>,
        fetched: Vec<FetchedProject>,
        only: Vec<Option<BTreeSet<String>>>,
    ) -> Result<EvalId, AppError> {
        if fetched.is_empty() {
            return Err(AppError::BadRequest("the submission holds no project".into()));
        }
        for p in &fetched {
            self.store.put_blob(&p.sha256, &p.archive).map_err(|e| AppError::Internal(e.to_string()))?;
        }
        let rec = {
            let mut st = self.lock();
            let id = self.new_eval_id(&st);
            let mut names: Vec<String> = Vec::new();
            let projects = fetched
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut name = p.name.clone();
                    let mut n = 2;
                    while names.contains(&name) {
                        name = format!("{}_{n}", p.name);
                        n += 1;
                    }
                    names.push(name.clone());
                    ProjectRecord {
                        id: format!("{id}-{i}"),
                        name,
                        url: p.url.clone(),
                        content_hash: p.sha256.clone(),
                        state: ProjectState::Preparing,
                    }
                })
                .collect();
            let rec = EvalRecord::new(id, self.udp_s.clone(), eval::now_secs(), projects);
            for (p, modules) in rec.projects.iter().zip(only) {
                if let Some(m) = modules {
                    st.rerun_only.insert(p.id.clone(), m);
                }
            }
            st.evals.insert(id, rec.clone());
            st.dirty.entry(id).or_default();
            rec
        };
        self.persist(&rec);
        tracing::info!(eval = rec.id, projects = rec.projects.len(), "evaluation submitted");
        // Replicate before answering, so that the evaluation survives this node's failure.
        sync::push_now(self, std::slice::from_ref(&rec)).await;
        for p in &rec.projects {
            self.spawn_discovery(rec.id, p.id.clone());
        }
        Ok(rec.id)
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
            tracing::error!(eval = rec.id, "persisting the evaluation failed: {e}");
        }
    }

    /// Applies `f` to a record's header (anything but adding results, see [`App::add_result`]),
    /// persisting and marking it for replication if it changed.
    fn update<R>(&self, id: EvalId, f: impl FnOnce(&mut EvalRecord) -> R) -> Option<R> {
        let (out, snapshot) = {
            let mut st = self.lock();
            let rec = st.evals.get_mut(&id)?;
            let before = rec.header_json();
            let out = f(rec);
            let snap = (rec.header_json() != before).then(|| rec.clone_header());
            if snap.is_some() {
                st.dirty.entry(id).or_default();
            }
            (out, snap)
        };
        if let Some(rec) = snapshot {
            self.persist(&rec);
            self.wake.notify_one();
        }
        Some(out)
    }

    /// Stores a task's result (unless it has one), persisting it and marking it for replication.
    fn add_result(&self, id: EvalId, task_id: &str, result: ModuleResult) -> bool {
        let delta = {
            let mut st = self.lock();
            let Some(rec) = st.evals.get_mut(&id) else { return false };
            if !rec.add_result(task_id, result, eval::now_secs()) {
                return false;
            }
            let delta = rec.delta([task_id.to_string()].iter());
            st.dirty.entry(id).or_default().insert(task_id.to_string());
            if let Some((pid, _)) = eval::split_task_id(task_id) {
                st.grades.remove(pid);
            }
            delta
        };
        self.persist(&delta);
        self.wake.notify_one();
        true
    }

    // ------------------------------------------------------------------ discovery

    fn spawn_discovery(self: &Arc<Self>, eval: EvalId, project_id: String) {
        if !self.lock().discovering.insert(project_id.clone()) {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            let state = app.discover(eval, &project_id).await;
            app.lock().discovering.remove(&project_id);
            let Some(state) = state else { return };
            let state = match state {
                ProjectState::Failed { error } => ProjectState::Failed { error: app.redact(&error) },
                other => other,
            };
            if let ProjectState::Failed { error } = &state {
                tracing::warn!(eval, project = %project_id, "project cannot be evaluated: {error}");
            }
            app.update(eval, |rec| {
                if let Some(p) = rec.projects.iter_mut().find(|p| p.id == project_id)
                    && matches!(p.state, ProjectState::Preparing)
                {
                    p.state = state;
                    rec.version += 1;
                    rec.settle(eval::now_secs());
                }
            });
            app.net().inspect(|n| n.push_cache());
        });
    }

    /// Discovers a project's modules under its configured runner and policies.
    async fn discover(self: &Arc<Self>, eval: EvalId, project_id: &str) -> Option<ProjectState> {
        let only = self.lock().rerun_only.remove(project_id);
        let project = self.lock().evals.get(&eval)?.project(project_id)?.clone();
        let root = match self.ensure_project(&project, None).await {
            Ok(root) => root,
            Err(e) => return Some(ProjectState::Failed { error: e }),
        };
        let (choice, settings) = match self.choose_runner(&project, &root).await {
            Ok(v) => v,
            Err(e) => return Some(ProjectState::Failed { error: e }),
        };
        let hash = project.content_hash.clone();
        let prepared =
            match self.prepare(&choice.runner, &project, &hash, &root, &settings.requirements).await {
                Ok(p) => p,
                Err(e) => return Some(ProjectState::Failed { error: e }),
            };
        let runner = match (self.runners)(&choice.runner) {
            Ok(r) => r,
            Err(e) => return Some(ProjectState::Failed { error: e }),
        };
        let modules = tokio::task::spawn_blocking(move || runner.discover(&prepared)).await;
        let modules = modules.map(|r| {
            r.map(|all| {
                all.into_iter().filter(|m| only.as_ref().is_none_or(|o| o.contains(m))).collect::<Vec<_>>()
            })
        });
        match modules {
            Ok(Ok(modules)) if !modules.is_empty() => Some(ProjectState::Ready {
                chunks: self.plan_chunks(&project.name, &modules),
                modules,
                runner: choice.runner,
                limits: choice.limits,
                policies: settings.policies,
            }),
            Ok(Ok(_)) | Ok(Err(cdtester_runner_api::RunnerError::NoTests)) => {
                Some(ProjectState::Failed { error: "no test modules found (pytest collects nothing)".into() })
            }
            Ok(Err(e)) => Some(ProjectState::Failed { error: e.to_string() }),
            Err(e) => Some(ProjectState::Failed { error: format!("discovery crashed: {e}") }),
        }
    }

    /// This node's own decision for a project: configuration rules, then the policy chain
    /// (admission, runner and limits), made once per project on this node. A worker decides itself rather than trusting the runner and
    /// limits a peer's record names: no peer can make this node run code less isolated than its
    /// own configuration says. Refuses the `local` runner for HTTP submissions when the API
    /// listens beyond loopback, unless `runner.local.allow_remote_submissions` is set.
    async fn choose_runner(
        self: &Arc<Self>,
        project: &ProjectRecord,
        root: &std::path::Path,
    ) -> Result<(RunnerChoice, cdtester_config::ProjectSettings), String> {
        if let Some(decided) = self.lock().choices.get(&project.id) {
            return Ok(decided.clone());
        }
        let mut settings = self.cfg.project_settings(&project.name, project.url.as_deref());
        if settings.runner_by_name && settings.runner != self.cfg.runner.default {
            // Names of submitted projects are the submitter's choice: they never route a
            // project away from the default runner (a URL rule or a policy may).
            tracing::warn!(project = %project.id, rule_runner = %settings.runner, "a rule matching only the submitted name does not choose the runner");
            settings.runner = self.cfg.runner.default.clone();
        }
        let app = self.clone();
        let (name, url, root) = (project.name.clone(), project.url.clone(), root.to_path_buf());
        let policies = settings.policies.clone();
        let configured = RunnerChoice { runner: settings.runner.clone(), limits: settings.limits.clone() };
        let choice = tokio::task::spawn_blocking(move || {
            let meta = ProjectMeta::from_dir(&name, url.as_deref(), &root).map_err(|e| e.to_string())?;
            app.policies.decide(&policies, &meta, configured)
        })
        .await
        .map_err(|e| format!("policy evaluation crashed: {e}"))??;
        // Beyond loopback: where the API listens (`node.http`, bound) or is advertised.
        if choice.runner == "local"
            && !(self.cfg.node.http.ip().is_loopback() && self.http.ip().is_loopback())
            && !self.cfg.runner.local.allow_remote_submissions
        {
            return Err(
                "refused: this node's API listens beyond loopback and the local runner does not isolate \
                 untrusted code; use the docker runner or set runner.local.allow_remote_submissions"
                    .into(),
            );
        }
        self.lock().choices.insert(project.id.clone(), (choice.clone(), settings.clone()));
        Ok((choice, settings))
    }

    /// How many chunks each slow module runs as: the local runner's planner
    /// ([`DurationStore::plan`]) over the remembered durations, for the network's worker slots.
    fn plan_chunks(&self, project: &str, modules: &[String]) -> BTreeMap<String, u32> {
        let keys: Vec<String> = modules.iter().map(|m| sched::duration_key(project, m)).collect();
        let known = {
            let mut st = self.lock();
            sched::remembered(self, &mut st, &keys)
        };
        let mut memory = DurationStore::in_memory();
        for (m, k) in modules.iter().zip(known) {
            if let Some((secs, tests)) = k {
                memory.record(project, m, ModuleStat { secs, tests });
            }
        }
        let slots = self.members().len() * self.cfg.runner.workers;
        memory
            .plan(project, modules, slots)
            .into_iter()
            .filter_map(|(task, _)| Some((task.modules.first()?.clone(), task.chunk?.count)))
            .collect()
    }

    /// Makes sure the project's files are extracted in this node's project cache (downloading the
    /// archive from `from`, or from the responsible node, when the blob is missing). Returns the
    /// project root.
    async fn ensure_project(
        &self,
        project: &ProjectRecord,
        from: Option<SocketAddr>,
    ) -> Result<PathBuf, String> {
        let hash = project.content_hash.clone();
        if !self.store.has_blob(&hash) {
            self.download_blob(project, from).await?;
        }
        let root = self.projects_dir.join(&hash);
        if root.is_dir() {
            return Ok(root);
        }
        let blob = self.store.blob_path(&hash).map_err(|e| e.to_string())?;
        let dir = self.projects_dir.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&blob).map_err(|e| format!("reading {}: {e}", blob.display()))?;
            let tmp = tempfile::tempdir_in(&dir).map_err(|e| e.to_string())?;
            crate::archive::extract_zip(&bytes, tmp.path()).map_err(|e| e.to_string())?;
            let tmp = tmp.keep();
            if let Err(e) = std::fs::rename(&tmp, &root) {
                let _ = std::fs::remove_dir_all(&tmp);
                if !root.is_dir() {
                    return Err(format!("installing {}: {e}", root.display()));
                }
            }
            Ok(root)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Downloads a project archive and checks its hash.
    async fn download_blob(&self, project: &ProjectRecord, from: Option<SocketAddr>) -> Result<(), String> {
        let mut sources: Vec<SocketAddr> = from.into_iter().collect();
        let (responsible, submitted_to) = {
            let st = self.lock();
            let rec = st.evals.values().find(|r| r.project(&project.id).is_some());
            (
                rec.and_then(|r| r.responsible.parse::<SocketAddr>().ok()),
                rec.and_then(|r| r.submitted_to.parse::<SocketAddr>().ok()),
            )
        };
        sources.extend(responsible.into_iter().chain(submitted_to));
        if let Some(net) = self.net() {
            sources.extend(net.snapshot().peers.values().filter_map(|a| a.parse::<SocketAddr>().ok()));
        }
        let mut last = format!("no node serves project {}", project.id);
        let mut tried = HashSet::new();
        for udp in sources {
            if udp == self.udp || !tried.insert(udp) {
                continue;
            }
            let Some(http) = self.http_of(udp) else { continue };
            let path = format!("/file/{}", project.id);
            match self.client.send(hyper::Method::GET, http, &path, None, Duration::from_secs(120)).await {
                Ok(resp) => {
                    let got = cdtester_runner_api::sha256_hex(&resp.body);
                    if got != project.content_hash {
                        last =
                            format!("archive from {udp} has sha256 {got}, expected {}", project.content_hash);
                        tracing::warn!("{last}");
                        continue;
                    }
                    self.store.put_blob(&got, &resp.body).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Prepares a project with a runner once per (content, runner) on this node.
    async fn prepare(
        &self,
        runner_name: &str,
        project: &ProjectRecord,
        hash: &str,
        root: &std::path::Path,
        requirements: &[String],
    ) -> Result<PreparedProject, String> {
        let runner = (self.runners)(runner_name)?;
        let cell = {
            let mut map = self.prepared_map();
            map.entry((hash.to_string(), runner_name.to_string())).or_default().clone()
        };
        let mut guard = cell.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let source = ProjectSource {
            id: format!("{hash}-{runner_name}"),
            name: project.name.clone(),
            root: root.to_path_buf(),
            extra_requirements: requirements.to_vec(),
        };
        let prepared = tokio::task::spawn_blocking(move || runner.prepare(&source))
            .await
            .map_err(|e| format!("preparation crashed: {e}"))?
            .map_err(|e| e.to_string())?;
        *guard = Some(prepared.clone());
        Ok(prepared)
    }

    // ------------------------------------------------------------------ queries

    /// Every evaluation id this node knows (the network's, by replication), oldest first.
    pub fn list(&self) -> Vec<EvalId> {
        let st = self.lock();
        let mut v: Vec<(f64, EvalId)> = st.evals.values().map(|r| (r.start_time, r.id)).collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// The full record of an evaluation.
    pub fn record(&self, id: EvalId) -> Option<EvalRecord> {
        self.lock().evals.get(&id).cloned()
    }

    /// The report of an evaluation (with per-test results when `with_tests`).
    pub fn report(&self, id: EvalId, with_tests: bool) -> Option<eval::EvalReport> {
        let rec = self.record(id)?;
        let grade = |p: &ProjectRecord, tests: &[TestResult]| self.grade(p, tests);
        Some(eval::build_report(&rec, eval::now_secs(), with_tests, &grade))
    }

    fn grade(&self, p: &ProjectRecord, tests: &[TestResult]) -> Option<f64> {
        if let Some(g) = self.lock().grades.get(&p.id) {
            return *g;
        }
        let policies = match &p.state {
            ProjectState::Ready { policies, .. } => policies.as_slice(),
            _ => &[],
        };
        let g = self.policies.grade(policies, &p.name, tests).value;
        self.lock().grades.insert(p.id.clone(), g);
        g
    }

    /// `/stats`.
    pub fn stats(&self) -> eval::Stats {
        let members = self.members();
        let st = self.lock();
        eval::stats(st.evals.values(), &members)
    }

    /// `/network`.
    pub fn network(&self) -> BTreeMap<String, Vec<String>> {
        match self.net() {
            Some(net) => net.snapshot().network,
            None => BTreeMap::from([(self.udp_s.clone(), Vec::new())]),
        }
    }

    /// The archive of a project, with its sha256 (`GET /file/<project id>`).
    pub fn project_file(&self, project_id: &str) -> Result<(String, Vec<u8>), AppError> {
        let hash = {
            let st = self.lock();
            st.evals.values().find_map(|r| r.project(project_id)).map(|p| p.content_hash.clone())
        };
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
                    crate::http::metrics::node().failure_detected()
                }
                sched::requeue_worker(self, addr, reason == crate::core::DownReason::Failed);
            }
            Event::TakeOver { failed_addr, .. } => {
                crate::http::metrics::node().election_won();
                self.take_over(failed_addr)
            }
            Event::Relinquish { failed_addr, owner, .. } => {
                crate::http::metrics::node().election_relinquished();
                tracing::info!(failed = %failed_addr, %owner, "another node owns the failed node's evaluations");
            }
            Event::CacheUpdate { from, data } => {
                let st = &mut *self.lock();
                let unknown = data
                    .content
                    .evaluations
                    .keys()
                    .filter_map(|k| k.parse::<EvalId>().ok())
                    .any(|id| !st.evals.contains_key(&id));
                if unknown {
                    st.sync_hints.insert(from);
                }
            }
            Event::PeerUp { addr, .. } => {
                self.lock().sync_hints.insert(addr);
            }
            Event::Joined { .. } | Event::Left => {}
        }
    }

    fn on_message(self: &Arc<Self>, from: SocketAddr, msg: Message) {
        match msg {
            Message::TaskAnnounce(_) => worker::on_announce(self, from),
            Message::TaskRequest(_) => sched::on_request(self, from),
            Message::TaskSend(data) => {
                if let Ok(port) = data.info.api_port.parse::<u16>() {
                    self.learn_http(from, SocketAddr::new(from.ip(), port));
                }
                worker::on_task_send(self, from, data.info);
            }
            Message::TaskConfirm(data) => sched::on_confirm(self, from, &data.task_id),
            Message::ProjectAnnounce(data) => {
                if let Ok(port) = data.api_port.parse::<u16>() {
                    self.learn_http(from, SocketAddr::new(from.ip(), port));
                }
                self.lock().sync_hints.insert(from);
            }
            Message::EvaluationResponsibilityUpdate(data) => {
                tracing::debug!(project = %data.project_id, node = %data.new_node, "responsibility update");
                if let Ok(addr) = data.new_node.parse() {
                    self.lock().sync_hints.insert(addr);
                }
            }
            other => tracing::debug!(cmd = other.cmd(), %from, "ignoring message"),
        }
    }

    /// This node now owns the failed node's evaluations: re-own them (new term) and requeue their
    /// unfinished tasks.
    fn take_over(self: &Arc<Self>, failed: SocketAddr) {
        let failed_s = wire::addr_string(failed);
        let ids: Vec<EvalId> = {
            let st = self.lock();
            st.evals
                .values()
                .filter(|r| r.responsible == failed_s && r.end_time.is_none())
                .map(|r| r.id)
                .collect()
        };
        tracing::info!(failed = %failed_s, evaluations = ids.len(), "taking over evaluations");
        for id in ids {
            let projects = self.update(id, |rec| {
                rec.term += 1;
                rec.version = 0;
                rec.responsible = self.udp_s.clone();
                rec.projects.clone()
            });
            sched::adopt_running(self, id, failed);
            for p in projects.unwrap_or_default() {
                if let Some(net) = self.net() {
                    net.broadcast(Message::EvaluationResponsibilityUpdate(wire::ResponsibilityUpdateData {
                        project_id: p.id.clone(),
                        new_node: self.udp_s.clone(),
                    }));
                }
                if matches!(p.state, ProjectState::Preparing) {
                    self.spawn_discovery(id, p.id);
                }
            }
        }
        sched::requeue_worker(self, failed, true);
        self.wake.notify_one();
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

/// The state the core pulls for CACHE_UPDATE and elections (reference-compatible summary).
pub struct CoreView(pub Arc<App>);

/// How many finished evaluations a CACHE_UPDATE carries besides the unfinished ones.
const CACHE_FINISHED_KEEP: usize = 20;

impl AppState for CoreView {
    fn cache_content(&self) -> CacheContent {
        let app = &self.0;
        let members = vec![app.udp_s.clone()];
        let st = app.lock();
        let mut finished: Vec<&EvalRecord> = st.evals.values().filter(|r| r.end_time.is_some()).collect();
        finished.sort_by(|a, b| b.end_time.unwrap_or(0.0).total_cmp(&a.end_time.unwrap_or(0.0)));
        let chosen = st
            .evals
            .values()
            .filter(|r| r.end_time.is_none())
            .chain(finished.into_iter().take(CACHE_FINISHED_KEEP));
        let mut content = CacheContent::default();
        for rec in chosen {
            content.evaluations.insert(
                rec.id.to_string(),
                wire::EvaluationEntry {
                    projects: rec.projects.iter().map(|p| p.id.clone()).collect(),
                    start_time: rec.start_time,
                    end_time: rec.end_time,
                },
            );
            for p in &rec.projects {
                let mut modules = BTreeMap::new();
                for m in p.modules() {
                    let progress = rec.module_progress(p, m);
                    let c = progress.counts();
                    let status = if progress.finished() {
                        wire::ModuleStatus::Finished
                    } else if progress.started() {
                        wire::ModuleStatus::Running
                    } else {
                        wire::ModuleStatus::Pending
                    };
                    let entry = wire::ModuleEntry {
                        passed: c.passes(),
                        failed: c.failures(),
                        time: progress.duration(),
                        status,
                    };
                    modules.insert(m.to_string(), entry);
                }
                content.projects.insert(
                    p.id.clone(),
                    wire::ProjectEntry {
                        project_name: p.name.clone(),
                        node: rec.responsible.clone(),
                        modules,
                    },
                );
            }
        }
        let s = eval::stats(st.evals.values(), &members);
        if let Some(row) = s.nodes.into_iter().next() {
            content.stats = wire::NodeStats {
                failed: row.failed,
                passed: row.passed,
                projects: row.projects,
                modules: row.modules,
                evaluations: row.evaluations.iter().map(|e| e.to_string()).collect(),
                submitted_evaluation: st
                    .evals
                    .values()
                    .filter(|r| r.submitted_to == app.udp_s)
                    .map(|r| r.id.to_string())
                    .collect(),
            };
        }
        content
    }

    fn active_evaluations(&self, failed_addr: &str) -> EvalMap {
        let st = self.0.lock();
        st.evals
            .values()
            .filter(|r| r.responsible == failed_addr && r.end_time.is_none())
            .map(|r| (r.id.to_string(), r.projects.iter().map(|p| p.id.clone()).collect()))
            .collect()
    }
}
