use serde::{Deserialize, Serialize};

/// The verdict of one test, as pytest reports it, plus the verdicts a sandbox adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    Error,
    Skipped,
    Xfailed,
    Xpassed,
    /// The module's wall-clock limit ran out before this test finished.
    Timeout,
    /// The sandbox killed the test run for exceeding its memory limit.
    Oom,
    /// The interpreter died (signal, abort) before this test reported.
    Crashed,
    /// The runner itself failed (engine unreachable, image missing): not the project's fault.
    #[serde(rename = "infra-error")]
    InfraError,
    /// Failed (or errored), then passed when its module was run again (`runner.retries`): every
    /// attempt is kept in [`crate::TestResult::attempts`]. Neither a pass nor a failure by
    /// itself: grading counts it as configured (`grading.flaky`).
    Flaky,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Passed,
        Outcome::Failed,
        Outcome::Error,
        Outcome::Skipped,
        Outcome::Xfailed,
        Outcome::Xpassed,
        Outcome::Timeout,
        Outcome::Oom,
        Outcome::Crashed,
        Outcome::InfraError,
        Outcome::Flaky,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Xfailed => "xfailed",
            Outcome::Xpassed => "xpassed",
            Outcome::Timeout => "timeout",
            Outcome::Oom => "oom",
            Outcome::Crashed => "crashed",
            Outcome::InfraError => "infra-error",
            Outcome::Flaky => "flaky",
        }
    }

    /// Counts as a success for grading (pytest's own notion: xpassed is not a failure unless strict,
    /// and strict xpasses are already reported as failed).
    pub fn is_pass(self) -> bool {
        matches!(self, Outcome::Passed | Outcome::Xpassed)
    }

    /// Counts against the project when grading: everything that ran and did not pass.
    pub fn is_fail(self) -> bool {
        matches!(self, Outcome::Failed | Outcome::Error | Outcome::Timeout | Outcome::Oom | Outcome::Crashed)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-outcome test counts of a module, project or evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub error: u64,
    pub skipped: u64,
    pub xfailed: u64,
    pub xpassed: u64,
    #[serde(default)]
    pub timeout: u64,
    #[serde(default)]
    pub oom: u64,
    #[serde(default)]
    pub crashed: u64,
    #[serde(default)]
    pub infra_error: u64,
    #[serde(default)]
    pub flaky: u64,
}

impl Counts {
    pub fn add(&mut self, outcome: Outcome) {
        *self.slot(outcome) += 1;
    }

    pub fn get(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Passed => self.passed,
            Outcome::Failed => self.failed,
            Outcome::Error => self.error,
            Outcome::Skipped => self.skipped,
            Outcome::Xfailed => self.xfailed,
            Outcome::Xpassed => self.xpassed,
            Outcome::Timeout => self.timeout,
            Outcome::Oom => self.oom,
            Outcome::Crashed => self.crashed,
            Outcome::InfraError => self.infra_error,
            Outcome::Flaky => self.flaky,
        }
    }

    fn slot(&mut self, outcome: Outcome) -> &mut u64 {
        match outcome {
            Outcome::Passed => &mut self.passed,
            Outcome::Failed => &mut self.failed,
            Outcome::Error => &mut self.error,
            Outcome::Skipped => &mut self.skipped,
            Outcome::Xfailed => &mut self.xfailed,
            Outcome::Xpassed => &mut self.xpassed,
            Outcome::Timeout => &mut self.timeout,
            Outcome::Oom => &mut self.oom,
            Outcome::Crashed => &mut self.crashed,
            Outcome::InfraError => &mut self.infra_error,
            Outcome::Flaky => &mut self.flaky,
        }
    }

    pub fn merge(&mut self, other: &Counts) {
        for o in Outcome::ALL {
            *self.slot(o) += other.get(o);
        }
    }

    pub fn total(&self) -> u64 {
        Outcome::ALL.iter().map(|o| self.get(*o)).sum()
    }

    /// Tests that passed (passed + xpassed).
    pub fn passes(&self) -> u64 {
        Outcome::ALL.iter().filter(|o| o.is_pass()).map(|o| self.get(*o)).sum()
    }

    /// Tests that ran and did not pass (failed, error, timeout, oom, crashed).
    pub fn failures(&self) -> u64 {
        Outcome::ALL.iter().filter(|o| o.is_fail()).map(|o| self.get(*o)).sum()
    }

    /// The default grade on 0..20: passes / (passes + failures) * 20, rounded to 2 decimals,
    /// flaky tests counted as passes (the default of `grading.flaky`; a node grading them as
    /// failures turns them into failures before grading). `None` when nothing gradable ran (only
    /// skips, or nothing at all).
    pub fn grade(&self) -> Option<f64> {
        let graded = self.passes() + self.failures() + self.flaky;
        if graded == 0 {
            return None;
        }
        Some(round2((self.passes() + self.flaky) as f64 / graded as f64 * 20.0))
    }
}

/// Rounds to two decimals, as every percentage and grade in reports is shown.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_round_trip_through_serde() {
        for o in Outcome::ALL {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            let back: Outcome = serde_json::from_str(&json).unwrap();
            assert_eq!(back, o);
        }
    }

    #[test]
    fn grade_counts_errors_and_timeouts_as_failures() {
        let mut c = Counts::default();
        for _ in 0..3 {
            c.add(Outcome::Passed);
        }
        c.add(Outcome::Failed);
        c.add(Outcome::Skipped);
        assert_eq!(c.grade(), Some(15.0));
        c.add(Outcome::Timeout);
        c.add(Outcome::Xpassed);
        assert_eq!(c.passes(), 4);
        assert_eq!(c.failures(), 2);
        assert_eq!(c.grade(), Some(13.33));
        assert_eq!(c.total(), 7);
    }

    #[test]
    fn flaky_tests_are_neither_passes_nor_failures_and_grade_as_passes() {
        let mut c = Counts::default();
        c.add(Outcome::Flaky);
        c.add(Outcome::Failed);
        assert_eq!((c.passes(), c.failures(), c.flaky, c.total()), (0, 1, 1, 2));
        assert_eq!(c.grade(), Some(10.0));
        assert!(!Outcome::Flaky.is_pass() && !Outcome::Flaky.is_fail());
    }

    #[test]
    fn only_skips_has_no_grade() {
        let mut c = Counts::default();
        c.add(Outcome::Skipped);
        assert_eq!(c.grade(), None);
    }
}
