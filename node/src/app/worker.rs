//! The worker side: running a task on one of this node's slots and delivering its result to
//! whichever node is responsible at delivery time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdtester_runner_api::{ModuleReport, TaskSpec, clip_message};

use super::App;
use crate::engine::{BatchAnswer, Input, Task, TaskPost};
use crate::eval::{ProjectRecord, ProjectState};
use crate::ids::{EvalId, ProjectId};

/// Runs a task the engine gave this node's slot, then reports it back (which frees the slot).
pub async fn run(app: Arc<App>, task: Task) {
    let started = Instant::now();
    let outcome = match task.project.clone() {
        Some(p) => Ok(p),
        None => match task.from {
            Some(from) => remote_project(&app, from, task.eval, task.task_id.project()).await,
            None => Err(format!("project {} is not ready", task.task_id.project())),
        },
    };
    let outcome = match outcome {
        Ok(project) => execute(&app, &task, &project).await,
        Err(e) => Err(e),
    };
    match &outcome {
        Ok(report) => {
            let c = report.counts();
            tracing::info!(task = %task.task_id, passed = c.passes(), failed = c.failures(), secs = started.elapsed().as_secs_f64(), "module ran");
        }
        Err(e) => {
            tracing::warn!(task = %task.task_id, "module could not run: {e}");
            crate::metrics::node().runner_error();
        }
    }
    let outcome = outcome.map(|r| app.redact_report(r)).map_err(|e| app.redact(&e));
    let attempt = format!("{:032x}", rand::random::<u128>());
    let post = TaskPost::new(app.udp, task.eval, &task.task_id, outcome, attempt);
    app.apply(Input::Ran { post, from: task.from });
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

/// Runs one module (or one chunk of it) of a project with this node's runner decision.
async fn execute(app: &Arc<App>, task: &Task, project: &ProjectRecord) -> Result<ModuleReport, String> {
    let ProjectState::Ready { runner: listed, .. } = &project.state else {
        return Err(format!("project {} is not ready", project.id));
    };
    let module = task.task_id.module().to_string();
    if !project.modules().contains(&module) {
        return Err(format!("project {} has no module {module:?}", project.id));
    }
    let root = app.ensure_project(project, task.from).await?;
    let (choice, settings) = app.choose_runner(project, &root).await?;
    if choice.runner != *listed {
        tracing::warn!(project = %project.id, listed = %listed, chosen = %choice.runner, "the record names another runner than this node's configuration: using this node's");
    }
    let prepared =
        app.prepare(&choice.runner, project, &project.content_hash, &root, &settings.requirements).await?;
    let runner = (app.runners)(&choice.runner)?;
    let mut spec = TaskSpec::new(task.task_id.to_string(), vec![module.clone()]);
    spec.chunk = task.task_id.chunk();
    let (limits, retries) = (choice.limits, settings.retries);
    // A module with failed tests runs again up to `retries` times on this worker (flaky tests).
    let run = move || {
        let report = runner.run(&prepared, &spec, &limits).map_err(|e| e.to_string())?;
        report
            .modules
            .into_iter()
            .find(|m| m.module == module)
            .ok_or_else(|| format!("the runner returned no report for {module}"))
    };
    let task_id = task.task_id.clone();
    tokio::task::spawn_blocking(move || {
        let mut runs = 0u32;
        ModuleReport::run_with_retries(retries, || {
            runs += 1;
            let r = run();
            if let (Err(e), true) = (&r, runs > 1) {
                tracing::warn!(task = %task_id, "a retry of the module could not run: {e}");
            }
            r
        })
    })
    .await
    .map_err(|e| format!("runner crashed: {e}"))?
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
