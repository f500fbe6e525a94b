//! The result of one task as a worker delivers it (`POST /task`), and the answer to it.

use cdtester_runner_api::{Counts, ModuleReport};
use serde::{Deserialize, Serialize};

use crate::ids::{EvalId, TaskId};
use crate::wire::TaskResultData;

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
    /// What worker `node` reports for a task: its module's report, or why it could not run.
    pub fn new(
        node: std::net::SocketAddr,
        eval: EvalId,
        task_id: &TaskId,
        outcome: Result<ModuleReport, String>,
        attempt: String,
    ) -> TaskPost {
        let (counts, time) = match &outcome {
            Ok(report) => (report.counts(), report.duration),
            Err(_) => (Counts::default(), 0.0),
        };
        let (report, error) = match outcome {
            Ok(report) => (Some(report), None),
            Err(e) => (None, Some(e)),
        };
        TaskPost {
            result: TaskResultData {
                task_id: task_id.to_string(),
                passed: counts.passes(),
                failed: counts.failures(),
                time,
                project_id: task_id.project().to_string(),
                module: task_id.module().to_string(),
                ip: node.ip().to_string(),
                port: node.port().to_string(),
            },
            eval_id: Some(eval),
            attempt,
            report,
            error,
        }
    }

    /// The worker's `ip:port`.
    pub fn node(&self) -> String {
        crate::wire::join_addr(&self.result.ip, &self.result.port)
    }
}

/// How a result post was taken (the `status` of the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accepted {
    /// Stored: the first result of the task.
    #[serde(rename = "success")]
    Stored,
    /// The task has a result already; this one is dropped.
    Duplicate,
    /// The task could not run there; it is handed out again.
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

/// The answer body of `POST /task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAnswer {
    pub status: Accepted,
}

/// Why a result post is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// Not the responsible node (now): the worker delivers elsewhere or later.
    #[error("{0}")]
    Unavailable(String),
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

    /// The seed protocol (§7.1.2) shows `port` as an integer; the reference sends a string.
    #[test]
    fn task_post_port_may_be_an_integer_but_not_out_of_range() {
        let seed = r#"{"task_id":"p1::test_x.py","passed":2,"failed":1,"time":0.5,"project_id":"p1","module":"test_x.py","ip":"127.0.0.1","port":8001}"#;
        let post: TaskPost = serde_json::from_str(seed).expect("seed-shaped body parses");
        assert_eq!(post.node(), "127.0.0.1:8001");
        assert_eq!(serde_json::to_value(&post).expect("serializes")["port"], "8001");
        for bad in ["70000", "-1", "1.5", "null", "[8001]"] {
            let body = seed.replace("8001}", &format!("{bad}}}"));
            assert!(serde_json::from_str::<TaskPost>(&body).is_err(), "port {bad} accepted");
        }
    }

    #[test]
    fn answers_use_the_reference_status_words() {
        let a: TaskAnswer = serde_json::from_str(r#"{"status":"success"}"#).expect("parses");
        assert_eq!(a.status, Accepted::Stored);
        assert_eq!(
            serde_json::to_string(&TaskAnswer { status: Accepted::Requeued }).unwrap(),
            r#"{"status":"requeued"}"#
        );
        assert!(serde_json::from_str::<TaskAnswer>(r#"{"status":"whatever"}"#).is_err());
    }
}
