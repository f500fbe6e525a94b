//! The worker side: running a task on one of this node's slots and delivering its result to
//! whichever node is responsible at delivery time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdtester_runner_api::{
    Limits, ModuleReport, PreparedProject, Runner, TaskReport, TaskSpec, clip_message,
};

use super::App;
use crate::engine::{BatchAnswer, Input, Task, TaskPost};
use crate::eval::{ProjectRecord, ProjectState};
use crate::ids::{EvalId, ProjectId, TaskId};

/// Runs a task the engine gave this node's slot (with the modules that run along with it),
/// then reports each module back, the task's own last (which frees the slot).
pub async fn run(app: Arc<App>, task: Task) {
    let started = Instant::now();
    let project = match task.project.clone() {
        Some(p) => Ok(p),
        None => match task.from {
            Some(from) => remote_project(&app, from, task.eval, task.task_id.project()).await,
            None => Err(format!("project {} is not ready", task.task_id.project())),
        },
    };
    let members: Vec<TaskId> = task.with.iter().chain(std::iter::once(&task.task_id)).cloned().collect();
    let outcomes = match project {
        Ok(project) => execute(&app, &task, &members, &project).await,
        Err(e) => vec![Err(e); members.len()],
    };
    let secs = started.elapsed().as_secs_f64();
    for (task_id, outcome) in members.into_iter().zip(outcomes) {
        match &outcome {
            Ok(report) => {
                let c = report.counts();
                tracing::info!(task = %task_id, passed = c.passes(), failed = c.failures(), secs, "module ran");
            }
            Err(e) => {
                tracing::warn!(task = %task_id, "module could not run: {e}");
                crate::metrics::node().runner_error();
            }
        }
        let outcome = outcome.map(|r| app.redact_report(r)).map_err(|e| app.redact(&e));
        let attempt = format!("{:032x}", rand::random::<u128>());
        let post = TaskPost::new(app.udp, task.eval, &task_id, outcome, attempt);
        if task_id == task.task_id {
            app.apply(Input::Ran { post, from: task.from });
        } else {
            app.apply(Input::RanAlong { post });
        }
    }
}

impl App {
    /// A report with this node's host paths hidden (what peers and clients see).
    fn redact_report(&self, mut report: ModuleReport) -> ModuleReport {
        report.note = report.note.map(|n| self.redact(&n));
        report.output = report.output.map(|o| self.redact(&o));
        for t in &mut report.tests {
            t.message = t.message.take().map(|m| self.redact(&m));
            for a in &mut t.attempts {
                a.message = a.message.take().map(|m| clip_message(&self.redact(&m)).to_string());
            }
        }
        report
    }
}

/// The project record for a task sent by `from`, fetching the evaluation record when this node
/// has not received it by replication yet.
async fn remote_project(
    app: &Arc<App>,
    from: SocketAddr,
    eval: EvalId,
    project_id: &ProjectId,
) -> Result<ProjectRecord, String> {
    let known = |app: &App| {
        app.engine()
            .record(eval)
            .and_then(|r| r.project(project_id).cloned())
            .filter(|p| matches!(p.state, ProjectState::Ready { .. }))
    };
    if let Some(p) = known(app) {
        return Ok(p);
    }
    let http = app.http_of(from).ok_or_else(|| format!("no HTTP address for {from}"))?;
    let rec = app
        .client
        .get_json(http, &format!("/internal/evaluation/{eval}"), Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    super::replicate(app, vec![rec], from);
    known(app).ok_or_else(|| format!("project {project_id} is not ready at {from}"))
}

/// Runs the `members` (modules, or one chunk of one) of a project with this node's runner
/// decision, as one task of the runner (which may run them in one session); a report per
/// member, in their order.
async fn execute(
    app: &Arc<App>,
    task: &Task,
    members: &[TaskId],
    project: &ProjectRecord,
) -> Vec<Result<ModuleReport, String>> {
    let modules: Vec<String> = members.iter().map(|t| t.module().to_string()).collect();
    let ready = match ready_runner(app, task, &modules, project).await {
        Ok(ready) => ready,
        Err(e) => return vec![Err(e); members.len()],
    };
    let Ready { runner, prepared, limits, retries } = ready;
    let mut spec = TaskSpec::new(task.task_id.to_string(), modules.clone());
    spec.chunk = task.task_id.chunk();
    let task_id = task.task_id.to_string();
    let run = tokio::task::spawn_blocking(move || {
        // The module's report from a task's run, taken out of it (each is handed on once).
        let take = |report: &mut Result<TaskReport, String>, module: &str| match report {
            Ok(r) => match r.modules.iter().position(|m| m.module == module) {
                Some(i) => Ok(r.modules.swap_remove(i)),
                None => Err(format!("the runner returned no report for {module}")),
            },
            Err(e) => Err(e.clone()),
        };
        let mut together = runner.run(&prepared, &spec, &limits).map_err(|e| e.to_string());
        // A module with failed tests runs again, alone, up to `retries` times on this worker
        // (flaky tests).
        modules
            .iter()
            .map(|module| {
                let mut first = Some(take(&mut together, module));
                let mut runs = 0u32;
                ModuleReport::run_with_retries(retries, || {
                    runs += 1;
                    let r = first.take().unwrap_or_else(|| {
                        let mut alone = TaskSpec::new(task_id.clone(), vec![module.clone()]);
                        alone.chunk = spec.chunk;
                        take(&mut runner.run(&prepared, &alone, &limits).map_err(|e| e.to_string()), module)
                    });
                    if let (Err(e), true) = (&r, runs > 1) {
                        tracing::warn!(task = %task_id, module, "a retry of the module could not run: {e}");
                    }
                    r
                })
            })
            .collect::<Vec<_>>()
    });
    match run.await {
        Ok(reports) => reports,
        Err(e) => vec![Err(format!("runner crashed: {e}")); members.len()],
    }
}

/// What runs a task's modules on this node.
struct Ready {
    runner: Arc<dyn Runner>,
    prepared: PreparedProject,
    limits: Limits,
    retries: u32,
}

/// The runner that runs `modules` of `project` on this node (by this node's configuration),
/// with the project prepared for it.
async fn ready_runner(
    app: &Arc<App>,
    task: &Task,
    modules: &[String],
    project: &ProjectRecord,
) -> Result<Ready, String> {
    let ProjectState::Ready { runner: listed, .. } = &project.state else {
        return Err(format!("project {} is not ready", project.id));
    };
    if let Some(m) = modules.iter().find(|m| !project.modules().contains(m)) {
        return Err(format!("project {} has no module {m:?}", project.id));
    }
    let root = app.ensure_project(project, task.from).await?;
    let (choice, settings) = app.choose_runner(project, &root).await?;
    if choice.runner != *listed {
        tracing::warn!(project = %project.id, listed = %listed, chosen = %choice.runner, "the record names another runner than this node's configuration: using this node's");
    }
    let prepared =
        app.prepare(&choice.runner, project, &project.content_hash, &root, &settings.requirements).await?;
    let runner = (app.runners)(&choice.runner)?;
    Ok(Ready { runner, prepared, limits: choice.limits, retries: settings.retries })
}

/// Delivers results to node `to` in one request (`POST /internal/results`) and feeds the
/// answers back to the engine, which sends unanswered results again later.
pub async fn deliver_batch(app: Arc<App>, to: SocketAddr, posts: Vec<TaskPost>) {
    let Some(http) = app.http_of(to) else {
        tracing::debug!(%to, "no HTTP address known: results wait");
        return;
    };
    let call = app.client.post_json::<_, Vec<BatchAnswer>>(
        http,
        "/internal/results",
        &posts,
        Duration::from_secs(30),
    );
    match call.await {
        Ok(answers) => {
            app.apply(Input::Delivered(answers));
        }
        Err(e) => tracing::debug!(%to, results = posts.len(), "delivery failed, retrying: {e}"),
    }
}
