//! The worker side: running a task on one of this node's slots and delivering its result to
//! whichever node is responsible at delivery time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdtester_runner_api::{ModuleReport, TaskSpec, clip_message};

use super::{App, AppError};
use crate::engine::{Delivery, Input, Task, TaskAnswer, TaskPost};
use crate::eval::{EvalId, ProjectRecord, ProjectState};

/// How long a worker keeps trying to deliver a result.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(900);

/// Runs a task the engine gave this node's slot, then reports it back (which frees the slot).
pub async fn run(app: Arc<App>, task: Task) {
    let started = Instant::now();
    let outcome = match task.project.clone() {
        Some(p) => Ok(p),
        None => match task.from {
            Some(from) => remote_project(&app, from, task.eval, &task.project_id).await,
            None => Err(format!("project {} is not ready", task.project_id)),
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
            crate::http::metrics::node().runner_error();
        }
    }
    let outcome = outcome.map(|r| app.redact_report(r)).map_err(|e| app.redact(&e));
    let attempt = format!("{:032x}", rand::random::<u128>());
    let post =
        TaskPost::new(app.udp, task.eval, &task.task_id, &task.project_id, &task.module, outcome, attempt);
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
    project_id: &str,
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
    if !project.modules().contains(&task.module) {
        return Err(format!("project {} has no module {:?}", project.id, task.module));
    }
    let root = app.ensure_project(project, task.from).await?;
    let (choice, settings) = app.choose_runner(project, &root).await?;
    if choice.runner != *listed {
        tracing::warn!(project = %project.id, listed = %listed, chosen = %choice.runner, "the record names another runner than this node's configuration: using this node's");
    }
    let prepared =
        app.prepare(&choice.runner, project, &project.content_hash, &root, &settings.requirements).await?;
    let runner = (app.runners)(&choice.runner)?;
    let mut spec = TaskSpec::new(task.task_id.clone(), vec![task.module.clone()]);
    spec.chunk = task.chunk;
    let (limits, module, retries) = (choice.limits, task.module.clone(), settings.retries);
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

/// Posts a result to node `to` (`POST /task`): the one client of that call.
pub async fn post_result(app: &App, to: SocketAddr, post: &TaskPost) -> Result<TaskAnswer, AppError> {
    let Some(http) = app.http_of(to) else {
        return Err(AppError::Unavailable(format!("no HTTP address known for {to}")));
    };
    match app.client.post_json::<_, TaskAnswer>(http, "/task", post, Duration::from_secs(30)).await {
        Ok(a) => Ok(a),
        Err(e) if e.status().is_some_and(|s| s.is_client_error()) => Err(AppError::BadRequest(e.to_string())),
        Err(e) => Err(AppError::Unavailable(e.to_string())),
    }
}

/// Delivers a result to the node responsible for its evaluation now, retrying (the responsible
/// node may be failing over) until it is accepted, refused, or no longer needed.
pub async fn deliver(app: Arc<App>, post: TaskPost, sender: Option<SocketAddr>) {
    let give_up = Instant::now() + DELIVERY_PATIENCE;
    let mut wait = Duration::from_millis(200);
    loop {
        let target = app.engine().delivery(&post);
        let result = match target {
            Delivery::Done => return,
            Delivery::Here => match super::accept_result(&app, post.clone(), app.udp).await {
                Ok(status) => Ok(status.to_string()),
                Err(e) => Err(e),
            },
            Delivery::To(t) => post_result(&app, t, &post).await.map(|a| a.status.as_str().to_string()),
            Delivery::Unknown => match sender {
                Some(t) => post_result(&app, t, &post).await.map(|a| a.status.as_str().to_string()),
                None => Err(AppError::Unavailable("no responsible node known".into())),
            },
        };
        match result {
            Ok(status) => {
                tracing::debug!(task = %post.result.task_id, %status, "result delivered");
                return;
            }
            Err(AppError::Unavailable(e)) | Err(AppError::Internal(e)) => {
                if Instant::now() > give_up {
                    tracing::error!(task = %post.result.task_id, "giving up delivering the result: {e}");
                    return;
                }
                tracing::debug!(task = %post.result.task_id, "delivery failed, retrying: {e}");
            }
            Err(e) => {
                tracing::warn!(task = %post.result.task_id, "result refused: {e}");
                return;
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}
