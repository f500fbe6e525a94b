//! The task plan of a project from remembered module durations: one task per module, longest
//! first, except that a dominant slow module is split into chunks. Schedulers (a node's engine,
//! `cdtester run`) use it; it only needs module names and what each took the last time.

use serde::{Deserialize, Serialize};

use crate::Chunk;

/// Estimate for a module never seen before, in seconds.
pub const UNKNOWN_MODULE_SECS: f64 = 0.5;
/// Modules faster than this are never split.
pub const MIN_SPLIT_SECS: f64 = 4.0;

/// What a module took the last time it ran whole (chunks summed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModuleStat {
    pub secs: f64,
    pub tests: u64,
}

/// One planned task: a module, or one chunk of it, with its estimated seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTask {
    pub module: String,
    pub chunk: Option<Chunk>,
    pub estimate: f64,
}

/// Tasks for `modules` on `workers` parallel slots, longest first. A module remembered (by
/// `known`) as longer than both [`MIN_SPLIT_SECS`] and half the project's fair share per worker
/// is split into chunks of about half a share each (small enough for longest-first to balance
/// the workers), at most one chunk per two tests and four per worker.
pub fn plan(
    modules: &[String],
    known: impl Fn(&str) -> Option<ModuleStat>,
    workers: usize,
) -> Vec<PlannedTask> {
    let workers = workers.max(1);
    let estimate = |m: &str| known(m).map_or(UNKNOWN_MODULE_SECS, |s| s.secs);
    let total: f64 = modules.iter().map(|m| estimate(m)).sum();
    let target = total / workers as f64 / 2.0;
    let mut tasks = Vec::new();
    for m in modules {
        let est = estimate(m);
        let tests = known(m).map_or(0, |s| s.tests);
        let chunks = if est > MIN_SPLIT_SECS && est > target && target > 0.0 {
            ((est / target).ceil() as u64).min(tests / 2).min(4 * workers as u64)
        } else {
            1
        };
        if chunks >= 2 {
            let count = chunks as u32;
            for index in 0..count {
                let chunk = Some(Chunk { index, count });
                tasks.push(PlannedTask { module: m.clone(), chunk, estimate: est / f64::from(count) });
            }
        } else {
            tasks.push(PlannedTask { module: m.clone(), chunk: None, estimate: est });
        }
    }
    tasks.sort_by(|a, b| b.estimate.total_cmp(&a.estimate));
    tasks
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn modules(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn memory(entries: &[(&str, f64, u64)]) -> HashMap<String, ModuleStat> {
        entries
            .iter()
            .map(|(m, secs, tests)| (m.to_string(), ModuleStat { secs: *secs, tests: *tests }))
            .collect()
    }

    #[test]
    fn plan_is_longest_first_and_splits_only_dominant_slow_modules() {
        let known = memory(&[("big.py", 35.0, 900), ("mid.py", 6.0, 50), ("small.py", 0.2, 5)]);
        let tasks = plan(&modules(&["small.py", "mid.py", "big.py", "new.py"]), |m| known.get(m).copied(), 2);
        let got: Vec<(&str, Option<Chunk>)> = tasks.iter().map(|t| (t.module.as_str(), t.chunk)).collect();
        // total 41.7, half a share 10.4: big.py -> 4 chunks of 8.75 s, then mid, new, small.
        let chunk = |index| Some(Chunk { index, count: 4 });
        assert_eq!(
            got,
            [
                ("big.py", chunk(0)),
                ("big.py", chunk(1)),
                ("big.py", chunk(2)),
                ("big.py", chunk(3)),
                ("mid.py", None),
                ("new.py", None),
                ("small.py", None)
            ]
        );
        assert_eq!(tasks[0].estimate, 8.75);
    }

    #[test]
    fn small_or_unknown_modules_run_whole() {
        let known = memory(&[("a.py", 3.0, 400), ("b.py", 3.0, 400), ("c.py", 30.0, 1)]);
        assert!(
            plan(&modules(&["a.py", "b.py", "c.py"]), |m| known.get(m).copied(), 2)
                .iter()
                .all(|t| t.chunk.is_none())
        );
        assert!(plan(&modules(&["a.py"]), |_| None, 2).iter().all(|t| t.chunk.is_none()));
    }
}
