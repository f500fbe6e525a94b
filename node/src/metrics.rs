//! Process-wide event counters of the node, bumped by one-line calls where the events happen
//! (failure detections, elections won or given up, runner errors) and read by `GET /metrics`
//! (`crate::http::metrics`). One node runs per process.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of events the application reports (process-wide).
#[derive(Debug, Default)]
pub struct NodeCounters {
    failure_detections: AtomicU64,
    elections_won: AtomicU64,
    elections_relinquished: AtomicU64,
    runner_errors: AtomicU64,
}

/// The counters' values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub failure_detections: u64,
    pub elections_won: u64,
    pub elections_relinquished: u64,
    pub runner_errors: u64,
}

static NODE: NodeCounters = NodeCounters {
    failure_detections: AtomicU64::new(0),
    elections_won: AtomicU64::new(0),
    elections_relinquished: AtomicU64::new(0),
    runner_errors: AtomicU64::new(0),
};

/// The process's event counters.
pub fn node() -> &'static NodeCounters {
    &NODE
}

impl NodeCounters {
    /// A peer was declared failed (not a graceful leave).
    pub fn failure_detected(&self) {
        self.failure_detections.fetch_add(1, Ordering::Relaxed);
    }

    /// This node won a recovery election (took over a failed node's evaluations).
    pub fn election_won(&self) {
        self.elections_won.fetch_add(1, Ordering::Relaxed);
    }

    /// This node gave a takeover up to a node with a smaller id.
    pub fn election_relinquished(&self) {
        self.elections_relinquished.fetch_add(1, Ordering::Relaxed);
    }

    /// A task could not run (project fetch, preparation or the runner failed).
    pub fn runner_error(&self) {
        self.runner_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn values(&self) -> CounterValues {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            failure_detections: load(&self.failure_detections),
            elections_won: load(&self.elections_won),
            elections_relinquished: load(&self.elections_relinquished),
            runner_errors: load(&self.runner_errors),
        }
    }
}
