//! Per-module duration memory and the task plan built from it (longest first, slow modules split
//! into chunks). Any scheduler can use it: it only needs module names and remembered times.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cdtester_runner_api::TaskSpec;

pub use cdtester_runner_api::plan::{MIN_SPLIT_SECS, ModuleStat, UNKNOWN_MODULE_SECS};

/// Remembered module durations, per project name, optionally persisted as JSON.
#[derive(Debug, Default)]
pub struct DurationStore {
    path: Option<PathBuf>,
    data: BTreeMap<String, BTreeMap<String, ModuleStat>>,
}

impl DurationStore {
    /// A store kept only in memory.
    pub fn in_memory() -> DurationStore {
        DurationStore::default()
    }

    /// Loads the store at `path`; a missing or unreadable file starts empty (and is rewritten on
    /// `save`).
    pub fn open(path: &Path) -> DurationStore {
        let data = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable duration memory");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        DurationStore { path: Some(path.to_path_buf()), data }
    }

    pub fn get(&self, project: &str, module: &str) -> Option<ModuleStat> {
        self.data.get(project)?.get(module).copied()
    }

    pub fn record(&mut self, project: &str, module: &str, stat: ModuleStat) {
        self.data.entry(project.to_string()).or_default().insert(module.to_string(), stat);
    }

    /// Writes the store to its file (atomically); a no-op for in-memory stores.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.data).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    /// Tasks for `modules` of `project` on `workers` parallel slots, with their estimated
    /// seconds ([`cdtester_runner_api::plan::plan`] over this memory).
    pub fn plan(&self, project: &str, modules: &[String], workers: usize) -> Vec<(TaskSpec, f64)> {
        cdtester_runner_api::plan::plan(modules, |m| self.get(project, m), workers)
            .into_iter()
            .map(|t| {
                let id = match t.chunk {
                    Some(c) => format!("{project}:{}#{}/{}", t.module, c.index, c.count),
                    None => format!("{project}:{}", t.module),
                };
                let mut spec = TaskSpec::new(id, vec![t.module]);
                spec.chunk = t.chunk;
                (spec, t.estimate)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use cdtester_runner_api::Chunk;

    use super::*;

    fn modules(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plan_is_longest_first_and_splits_only_dominant_slow_modules() {
        let mut s = DurationStore::in_memory();
        s.record("p", "big.py", ModuleStat { secs: 35.0, tests: 900 });
        s.record("p", "mid.py", ModuleStat { secs: 6.0, tests: 50 });
        s.record("p", "small.py", ModuleStat { secs: 0.2, tests: 5 });
        let plan = s.plan("p", &modules(&["small.py", "mid.py", "big.py", "new.py"]), 2);
        let ids: Vec<&str> = plan.iter().map(|(t, _)| t.task_id.as_str()).collect();
        // total 41.7, half a share 10.4: big.py -> 4 chunks of 8.75 s, then mid, new, small.
        assert_eq!(
            ids,
            [
                "p:big.py#0/4",
                "p:big.py#1/4",
                "p:big.py#2/4",
                "p:big.py#3/4",
                "p:mid.py",
                "p:new.py",
                "p:small.py"
            ]
        );
        assert_eq!(plan[1].0.chunk, Some(Chunk { index: 1, count: 4 }));
        assert!(plan.iter().all(|(t, _)| t.modules.len() == 1));
    }

    #[test]
    fn small_or_unknown_modules_run_whole() {
        let mut s = DurationStore::in_memory();
        s.record("p", "a.py", ModuleStat { secs: 3.0, tests: 400 });
        s.record("p", "b.py", ModuleStat { secs: 3.0, tests: 400 });
        s.record("p", "c.py", ModuleStat { secs: 30.0, tests: 1 });
        assert!(s.plan("p", &modules(&["a.py", "b.py", "c.py"]), 2).iter().all(|(t, _)| t.chunk.is_none()));
        assert!(s.plan("q", &modules(&["a.py"]), 2).iter().all(|(t, _)| t.chunk.is_none()));
    }

    #[test]
    fn store_round_trips_through_its_file_and_tolerates_garbage() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sub/durations.json");
        let mut s = DurationStore::open(&path);
        s.record("p", "m.py", ModuleStat { secs: 1.5, tests: 3 });
        s.save().unwrap();
        assert_eq!(DurationStore::open(&path).get("p", "m.py"), Some(ModuleStat { secs: 1.5, tests: 3 }));
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(DurationStore::open(&path).get("p", "m.py"), None);
    }
}
