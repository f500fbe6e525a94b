//! The worker side: asking for work, running a module, delivering its result to whichever node
//! is responsible at delivery time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdtester_runner_api::{Chunk, Counts, ModuleReport, TaskSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedSemaphorePermit;

use super::sched::{self, Assigned};
use super::{App, AppError, sync};
use crate::eval::{self, EvalId, ProjectRecord, ProjectState};
use crate::wire::{self, Message, NodeIdData, TaskConfirmData, TaskInfo, TaskResultData};

/// How long a worker keeps trying to deliver a result.
const DELIVERY_PATIENCE: Duration = Duration::from_secs(900);

/// Body of `POST /task`: the reference's TASK_RESULT fields (`task_id`, `passed`, `failed`,
/// `time`, `project_id`, `module`, the worker's UDP `ip` and `port` as a string) plus cdtester's:
/// the evaluation id, the attempt id, and the per-test report (or the error that kept the module
/// from running).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPost {
    #[serde(flatten)]
    pub result: TaskResultData,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_id: Option<EvalId>,
    #[serde(default)]
    pub attempt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ModuleReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TaskPost {
    /// What `app`'s worker reports for a task: its module's report, or why it could not run.
    fn new(
        app: &App,
        eval: EvalId,
        task_id: &str,
        project_id: &str,
        module: &str,
        outcome: Result<ModuleReport, String>,
    ) -> TaskPost {
        let (counts, time) = match &outcome {
            Ok(report) => (report.counts(), report.duration),
            Err(_) => (Counts::default(), 0.0),
        };
        let (report, error) = match outcome {
            Ok(mut report) => {
                report.note = report.note.map(|n| app.redact(&n));
                report.output = report.output.map(|o| app.redact(&o));
                for t in &mut report.tests {
                    t.message = t.message.take().map(|m| app.redact(&m));
                }
                (Some(report), None)
            }
            Err(e) => (None, Some(app.redact(&e))),
        };
        TaskPost {
            result: TaskResultData {
                task_id: task_id.to_string(),
                passed: counts.passes(),
                failed: counts.failures(),
                time,
                project_id: project_id.to_string(),
                module: module.to_string(),
                ip: app.udp.ip().to_string(),
                port: app.udp.port().to_string(),
            },
            eval_id: Some(eval),
            attempt: format!("{:032x}", rand::random::<u128>()),
            report,
            error,
        }
    }

    /// The worker's `ip:port`.
    pub fn node(&self) -> String {
        crate::wire::join_addr(&self.result.ip, &self.result.port)
    }
}

/// TASK_ANNOUNCE: ask for work if a slot is free.
pub fn on_announce(app: &Arc<App>, from: SocketAddr) {
    if from == app.udp {
        return;
    }
    app.lock().announcers.insert(from, Instant::now());
    if app.slots.available_permits() > 0 {
        request(app, from);
    }
}

fn request(app: &App, to: SocketAddr) {
    let Some(net) = app.net() else { return };
    let Some(id) = net.snapshot().id else { return };
    net.send(to, Message::TaskRequest(NodeIdData { id }));
}

/// After a slot frees up: ask the nodes that announced work recently right away, instead of
/// waiting for their next TASK_ANNOUNCE.
fn ask_again(app: &App) {
    let recent = Duration::from_millis(app.cfg.timers.task_announce_ms.saturating_mul(3));
    let targets: Vec<SocketAddr> = {
        let mut st = app.lock();
        st.announcers.retain(|_, at| at.elapsed() <= recent);
        st.announcers.keys().copied().collect()
    };
    if app.slots.available_permits() > 0 {
        for t in targets {
            request(app, t);
        }
    }
}

/// TASK_SEND: confirm and run it if a slot is still free.
pub fn on_task_send(app: &Arc<App>, from: SocketAddr, info: TaskInfo) {
    let (module, chunk) = eval::parse_task_part(&info.module);
    let module = module.to_string();
    let Ok(permit) = app.slots.clone().try_acquire_owned() else {
        tracing::debug!(task = %eval::task_id(&info.project_id, &info.module), "no free slot: not confirming");
        return;
    };
    let Some(eval) = info.eval_id.as_deref().and_then(|e| e.parse::<EvalId>().ok()) else {
        tracing::warn!(%from, "TASK_SEND without a cdtester evaluation id ignored");
        return;
    };
    let task_id = eval::task_id(&info.project_id, &info.module);
    if let Some(net) = app.net() {
        net.send(from, Message::TaskConfirm(TaskConfirmData { task_id: task_id.clone() }));
    }
    let app = app.clone();
    tokio::spawn(async move {
        let post = match remote_project(&app, from, eval, &info.project_id).await {
            Ok(project) => execute(&app, eval, &project, &module, chunk, Some(from)).await,
            Err(e) => TaskPost::new(&app, eval, &task_id, &info.project_id, &module, Err(e)),
        };
        drop(permit);
        ask_again(&app);
        deliver(&app, post, Some(from)).await;
    });
}

/// Runs a task this node handed to itself.
pub async fn run_local(app: Arc<App>, task: Assigned, permit: OwnedSemaphorePermit) {
    let post = execute(&app, task.eval, &task.project, &task.module, task.chunk, None).await;
    drop(permit);
    deliver(&app, post, None).await;
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
        app.record(eval)
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
    sync::merge_records(app, vec![rec], from);
    known(app).ok_or_else(|| format!("project {project_id} is not ready at {from}"))
}

/// Runs one module (or one chunk of it) of a project with the project's runner and limits.
async fn execute(
    app: &Arc<App>,
    eval: EvalId,
    project: &ProjectRecord,
    module: &str,
    chunk: Option<Chunk>,
    from: Option<SocketAddr>,
) -> TaskPost {
    let task_id = eval::task_id(&project.id, &eval::task_part(module, chunk));
    let started = Instant::now();
    let outcome = async {
        let ProjectState::Ready { runner: listed, .. } = &project.state else {
            return Err(format!("project {} is not ready", project.id));
        };
        let root = app.ensure_project(project, from).await?;
        let (choice, settings) = app.choose_runner(project, &root).await?;
        if choice.runner != *listed {
            tracing::warn!(project = %project.id, listed = %listed, chosen = %choice.runner, "the record names another runner than this node's configuration: using this node's");
        }
        let prepared =
            app.prepare(&choice.runner, project, &project.content_hash, &root, &settings.requirements).await?;
        let runner = (app.runners)(&choice.runner)?;
        let mut spec = TaskSpec::new(task_id.clone(), vec![module.to_string()]);
        spec.chunk = chunk;
        let limits = choice.limits;
        let report = tokio::task::spawn_blocking(move || runner.run(&prepared, &spec, &limits))
            .await
            .map_err(|e| format!("runner crashed: {e}"))?
            .map_err(|e| e.to_string())?;
        report
            .modules
            .into_iter()
            .find(|m| m.module == module)
            .ok_or_else(|| format!("the runner returned no report for {module}"))
    }
    .await;
    match outcome {
        Ok(report) => {
            let c = report.counts();
            tracing::info!(task = %task_id, passed = c.passes(), failed = c.failures(), secs = started.elapsed().as_secs_f64(), "module ran");
            TaskPost::new(app, eval, &task_id, &project.id, module, Ok(report))
        }
        Err(e) => {
            tracing::warn!(task = %task_id, "module could not run: {e}");
            crate::http::metrics::node().runner_error();
            TaskPost::new(app, eval, &task_id, &project.id, module, Err(e))
        }
    }
}

/// Delivers a result to the node responsible for its evaluation now, retrying (the responsible
/// node may be failing over) until it is accepted, refused, or no longer needed.
async fn deliver(app: &Arc<App>, post: TaskPost, sender: Option<SocketAddr>) {
    let Some(eval) = post.eval_id else { return };
    let give_up = Instant::now() + DELIVERY_PATIENCE;
    let mut wait = Duration::from_millis(200);
    loop {
        let rec = app.record(eval);
        if rec.as_ref().is_some_and(|r| r.results.contains_key(&post.result.task_id)) {
            return;
        }
        let target: Option<SocketAddr> = rec.as_ref().and_then(|r| r.responsible.parse().ok()).or(sender);
        let result = match target {
            Some(t) if t == app.udp => {
                sched::accept(app, post.clone(), app.udp).await.map(|a| a.as_str().to_string())
            }
            Some(t) => match app.http_of(t) {
                Some(http) => {
                    #[derive(Deserialize)]
                    struct Answer {
                        status: String,
                    }
                    match app
                        .client
                        .post_json::<_, Answer>(http, "/task", &post, Duration::from_secs(30))
                        .await
                    {
                        Ok(a) => Ok(a.status),
                        Err(e) if e.status().is_some_and(|s| s.is_client_error()) => {
                            Err(AppError::BadRequest(e.to_string()))
                        }
                        Err(e) => Err(AppError::Unavailable(e.to_string())),
                    }
                }
                None => {
                    Err(AppError::Unavailable(format!("no HTTP address known for {}", wire::addr_string(t))))
                }
            },
            None => Err(AppError::Unavailable("no responsible node known".into())),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference implementation's `POST /task` body parses, and ours keeps its flat shape.
    #[test]
    fn task_post_keeps_the_reference_shape() {
        let reference = r#"{"task_id":"p1::test_x.py","passed":2,"failed":1,"time":0.5,"project_id":"p1","module":"test_x.py","ip":"127.0.0.1","port":"8001"}"#;
        let post: TaskPost = serde_json::from_str(reference).expect("reference body parses");
        assert_eq!(post.result.task_id, "p1::test_x.py");
        assert_eq!((post.result.passed, post.result.failed), (2, 1));
        assert_eq!(post.node(), "127.0.0.1:8001");
        assert!(post.report.is_none() && post.eval_id.is_none());
        let ours: serde_json::Value = serde_json::to_value(&post).expect("serializes");
        assert_eq!(ours["port"], "8001");
        assert_eq!(ours["task_id"], "p1::test_x.py");
        assert!(ours.get("result").is_none(), "{ours}");
    }
}
