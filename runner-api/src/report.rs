use serde::{Deserialize, Serialize};

use crate::{Counts, Outcome};

/// One test's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// pytest node id, e.g. `tests/test_x.py::TestA::test_b[1]`.
    pub nodeid: String,
    pub outcome: Outcome,
    /// Seconds.
    pub duration: f64,
    /// Failure, error or skip message (first line of the reason), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Everything one module produced when it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleReport {
    /// Module path relative to the project root, e.g. `tests/test_x.py`.
    pub module: String,
    pub tests: Vec<TestResult>,
    /// Wall-clock seconds spent on this module.
    pub duration: f64,
    /// A note about the run as a whole (e.g. "pytest exited 4: usage error"), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Captured output (capped), kept for diagnosing errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// True when `output` was cut at the runner's output cap.
    #[serde(default)]
    pub output_truncated: bool,
}

impl ModuleReport {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for t in &self.tests {
            c.add(t.outcome);
        }
        c
    }
}

/// The result of one task: one report per module of the task, in the task's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub modules: Vec<ModuleReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_json() {
        let report = TaskReport {
            modules: vec![ModuleReport {
                module: "tests/test_a.py".into(),
                tests: vec![
                    TestResult {
                        nodeid: "tests/test_a.py::test_ok".into(),
                        outcome: Outcome::Passed,
                        duration: 0.01,
                        message: None,
                    },
                    TestResult {
                        nodeid: "tests/test_a.py::test_bad[1]".into(),
                        outcome: Outcome::Failed,
                        duration: 0.5,
                        message: Some("assert 1 == 2".into()),
                    },
                ],
                duration: 0.7,
                note: None,
                output: Some("boom".into()),
                output_truncated: true,
            }],
        };
        let json = serde_json::to_string(&report).unwrap();
        let back: TaskReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        let c = back.modules[0].counts();
        assert_eq!((c.passed, c.failed, c.total()), (1, 1, 2));
    }
}
