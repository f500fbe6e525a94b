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
    /// Every attempt, oldest first, when the test was run more than once (its module was rerun
    /// after it failed: `runner.retries`); empty when it ran once. `duration` is then the sum
    /// of the attempts' and `message` the last failing attempt's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
}

/// Most runs of one test: the first and [`MAX_ATTEMPTS`] - 1 retries.
pub const MAX_ATTEMPTS: usize = 6;
/// Longest message (bytes) an attempt keeps; longer ones are cut.
pub const MAX_ATTEMPT_MESSAGE: usize = 16 * 1024;

/// `m` cut to at most [`MAX_ATTEMPT_MESSAGE`] bytes (at a character boundary).
pub fn clip_message(m: &str) -> &str {
    let mut end = m.len().min(MAX_ATTEMPT_MESSAGE);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    &m[..end]
}

/// One run of a test that ran more than once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub outcome: Outcome,
    /// Seconds.
    pub duration: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl TestResult {
    /// A result of a test that ran once.
    pub fn new(
        nodeid: impl Into<String>,
        outcome: Outcome,
        duration: f64,
        message: Option<String>,
    ) -> TestResult {
        TestResult { nodeid: nodeid.into(), outcome, duration, message, attempts: Vec::new() }
    }

    fn attempt(&self) -> Attempt {
        let message = self.message.as_deref().map(|m| clip_message(m).to_string());
        Attempt { outcome: self.outcome, duration: self.duration, message }
    }

    /// Whether the attempts are what a retry makes (checked on every result a peer sends):
    /// none, or 2 to [`MAX_ATTEMPTS`] whose first failed, none `flaky`, messages within
    /// [`MAX_ATTEMPT_MESSAGE`], durations finite and not negative; a `flaky` test has attempts
    /// ending in a pass.
    pub fn check_attempts(&self) -> Result<(), String> {
        let a = &self.attempts;
        let bad =
            |why: &str| Err(format!("test {:?}: {why}", self.nodeid.chars().take(80).collect::<String>()));
        if a.len() == 1 || a.len() > MAX_ATTEMPTS {
            return bad(&format!("{} attempts (0 or 2 to {MAX_ATTEMPTS})", a.len()));
        }
        if a.iter().any(|x| {
            x.outcome == Outcome::Flaky
                || !(x.duration.is_finite() && x.duration >= 0.0)
                || x.message.as_ref().is_some_and(|m| m.len() > MAX_ATTEMPT_MESSAGE)
        }) {
            return bad("an attempt is flaky, has an invalid duration or too long a message");
        }
        if a.first().is_some_and(|x| !x.outcome.is_fail()) {
            return bad("the first attempt did not fail: there was nothing to retry");
        }
        if self.outcome == Outcome::Flaky && !a.last().is_some_and(|x| x.outcome.is_pass()) {
            return bad("flaky without a passing last attempt");
        }
        Ok(())
    }

    /// Adds another run of this failing test: a pass makes it `flaky`, a failure is the new
    /// outcome, anything else (a skip) leaves the failure standing. Every attempt is kept.
    fn absorb(&mut self, again: &TestResult) {
        if self.attempts.is_empty() {
            self.attempts.push(self.attempt());
        }
        self.attempts.push(again.attempt());
        self.duration += again.duration;
        if again.outcome.is_pass() {
            self.outcome = Outcome::Flaky;
        } else if again.outcome.is_fail() {
            self.outcome = again.outcome;
            self.message = again.message.clone();
        }
    }
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

    /// [`TestResult::check_attempts`] of every test.
    pub fn check_attempts(&self) -> Result<(), String> {
        self.tests.iter().try_for_each(TestResult::check_attempts)
    }

    /// Whether a test failed (or errored, timed out, crashed): what a retry runs the module again for.
    pub fn has_failures(&self) -> bool {
        self.tests.iter().any(|t| t.outcome.is_fail())
    }

    /// Takes in a run of the same module made because tests failed: each failing test gets the
    /// new run's attempt ([`TestResult::attempts`]; a pass now makes it `flaky`); tests that did
    /// not fail keep their first result; tests only the new run reports are added. The module's
    /// duration is the runs' sum; its note and output stay the first run's (that saw the failure).
    pub fn absorb_retry(&mut self, again: ModuleReport) {
        self.duration += again.duration;
        for new in again.tests {
            match self.tests.iter_mut().find(|t| t.nodeid == new.nodeid) {
                Some(t) if t.outcome.is_fail() => t.absorb(&new),
                Some(_) => {}
                None => self.tests.push(new),
            }
        }
        if self.note.is_none() {
            self.note = again.note;
        }
    }

    /// Runs a module with `run`, then again while tests fail, up to `retries` more times
    /// ([`ModuleReport::absorb_retry`]). A retry that cannot run ends the retries with what the
    /// earlier runs reported (`run` reports its own errors).
    pub fn run_with_retries<E>(
        retries: u32,
        mut run: impl FnMut() -> Result<ModuleReport, E>,
    ) -> Result<ModuleReport, E> {
        let mut report = run()?;
        for _ in 0..retries {
            if !report.has_failures() {
                break;
            }
            match run() {
                Ok(again) => report.absorb_retry(again),
                Err(_) => break,
            }
        }
        Ok(report)
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
                    TestResult::new("tests/test_a.py::test_ok", Outcome::Passed, 0.01, None),
                    TestResult::new(
                        "tests/test_a.py::test_bad[1]",
                        Outcome::Failed,
                        0.5,
                        Some("assert 1 == 2".into()),
                    ),
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

    fn module(tests: Vec<TestResult>) -> ModuleReport {
        ModuleReport {
            module: "t.py".into(),
            tests,
            duration: 1.0,
            note: None,
            output: None,
            output_truncated: false,
        }
    }

    #[test]
    fn a_failing_test_that_passes_on_a_retry_is_flaky_with_both_attempts() {
        let fail = |id: &str| TestResult::new(id, Outcome::Failed, 0.25, Some("boom".into()));
        let pass = |id: &str| TestResult::new(id, Outcome::Passed, 0.5, None);
        let runs = std::cell::RefCell::new(vec![
            module(vec![pass("t.py::a"), fail("t.py::b"), fail("t.py::c")]),
            module(vec![fail("t.py::a"), pass("t.py::b"), fail("t.py::c")]),
            module(vec![pass("t.py::a"), fail("t.py::b"), fail("t.py::c")]),
        ]);
        let next = || Ok::<_, String>(runs.borrow_mut().remove(0));
        let r = ModuleReport::run_with_retries(2, next).expect("runs");
        assert!(runs.borrow().is_empty(), "ran three times: c kept failing");
        let [a, b, c] = [&r.tests[0], &r.tests[1], &r.tests[2]];
        assert_eq!(
            (a.outcome, a.attempts.len()),
            (Outcome::Passed, 0),
            "a passed at once: its reruns ignored"
        );
        assert_eq!(b.outcome, Outcome::Flaky);
        let outcomes: Vec<Outcome> = b.attempts.iter().map(|x| x.outcome).collect();
        assert_eq!(outcomes, [Outcome::Failed, Outcome::Passed], "b settled on its second attempt");
        assert_eq!((b.duration, b.message.as_deref()), (0.75, Some("boom")));
        assert_eq!((c.outcome, c.attempts.len()), (Outcome::Failed, 3));
        assert_eq!(r.duration, 3.0);
        let back: ModuleReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(r.check_attempts(), Ok(()));
        let c = r.counts();
        assert_eq!((c.passed, c.flaky, c.failed), (1, 1, 1));
    }

    #[test]
    fn forged_attempts_are_refused() {
        let mut t = TestResult::new("t.py::x", Outcome::Failed, 0.1, Some("boom".into()));
        t.absorb(&TestResult::new("t.py::x", Outcome::Passed, 0.1, None));
        assert_eq!(t.check_attempts(), Ok(()));
        type Forgery = Box<dyn Fn(&mut TestResult)>;
        let forgeries: Vec<Forgery> = vec![
            Box::new(|t| t.attempts.truncate(1)),
            Box::new(|t| t.attempts = vec![t.attempts[0].clone(); MAX_ATTEMPTS + 1]),
            Box::new(|t| t.attempts[0].outcome = Outcome::Passed),
            Box::new(|t| t.attempts[1].outcome = Outcome::Flaky),
            Box::new(|t| t.attempts[1].outcome = Outcome::Failed),
            Box::new(|t| t.attempts[0].duration = f64::NAN),
            Box::new(|t| t.attempts[0].message = Some("x".repeat(MAX_ATTEMPT_MESSAGE + 1))),
            Box::new(|t| t.attempts.clear()),
        ];
        for (i, forge) in forgeries.iter().enumerate() {
            let mut f = t.clone();
            forge(&mut f);
            assert!(f.check_attempts().is_err(), "forgery {i}: {f:?}");
        }
        let long = TestResult::new("t.py::y", Outcome::Failed, 0.1, Some("é".repeat(MAX_ATTEMPT_MESSAGE)));
        assert!(long.attempt().message.is_some_and(|m| m.len() <= MAX_ATTEMPT_MESSAGE));
    }

    #[test]
    fn no_retry_without_failures_or_retries() {
        let mut calls = 0;
        let r = ModuleReport::run_with_retries(3, || {
            calls += 1;
            Ok::<_, String>(module(vec![TestResult::new("t.py::a", Outcome::Passed, 0.1, None)]))
        });
        assert_eq!((calls, r.expect("ran").tests[0].attempts.len()), (1, 0));
        let mut calls = 0;
        let _ = ModuleReport::run_with_retries(0, || {
            calls += 1;
            Ok::<_, String>(module(vec![TestResult::new("t.py::a", Outcome::Failed, 0.1, None)]))
        });
        assert_eq!(calls, 1);
    }
}
