//! Durable node state in one redb database under the data directory, plus a content-addressed
//! blob directory for project archives.
//!
//! Tables:
//! - `evaluations`: evaluation id -> the evaluation record without its results, as JSON
//!   (projects, responsibility, progress); `results`: (evaluation id, task id) -> one task's
//!   per-test result as JSON, written once per result (so storing a result costs its own size,
//!   not the evaluation's). Records only grow by merging (see [`crate::eval::EvalRecord::merge`]),
//!   so `/stats` totals computed from them never decrease, across restarts too.
//! - `module_durations`: `"<project name>::<module>"` -> (seconds, tests) of the module's last
//!   run, used for longest-first scheduling and for splitting slow modules into chunks.
//! - `members`: the UDP addresses of the members the engine last counted for majorities, so
//!   that a restarted node does not count itself a majority before it sees them again.
//! - `test_history`: (project name, test node id) -> the test's last [`HISTORY_KEEP`] runs
//!   across evaluations of projects of that name (evaluation, outcome, duration, when), as JSON;
//!   written with the result that holds the run, once per evaluation.
//!
//! Blobs: `<data_dir>/blobs/<sha256>.zip`, written to a temporary file and renamed, so a reader
//! never sees a partial archive.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cdtester_runner_api::plan::ModuleStat;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use cdtester_runner_api::Outcome;
use serde::{Deserialize, Serialize};

use crate::eval::{EvalRecord, ModuleResult};
use crate::ids::{EvalId, IdError, TaskId};

/// Runs of a test the history keeps.
pub const HISTORY_KEEP: usize = 20;
/// Tests of a project `GET /history/{project}` lists at most.
pub const HISTORY_MAX_TESTS: usize = 10_000;
/// Longest test node id (bytes) the history records.
const HISTORY_MAX_NODEID: usize = 1024;

/// One run of a test, in its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRun {
    pub eval: EvalId,
    pub outcome: Outcome,
    /// Seconds (all attempts of a retried test).
    pub duration: f64,
    /// When its result was accepted (seconds since the Unix epoch).
    pub at: f64,
}

const HISTORY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("test_history");
const EVALUATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("evaluations");
const RESULTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("results");
const DURATIONS: TableDefinition<&str, (f64, u64)> = TableDefinition::new("module_durations");
const MEMBERS: TableDefinition<&str, ()> = TableDefinition::new("members");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database: {0}")]
    Db(#[from] redb::Error),
    #[error("store I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("stored record {0} is corrupt: {1}")]
    Corrupt(u64, serde_json::Error),
    #[error("stored record {0} has an invalid task id: {1}")]
    BadTask(u64, IdError),
    #[error("a content hash must be 64 lowercase hex digits")]
    BadHash,
}

/// Page cache of the store.
const STORE_CACHE_BYTES: usize = 8 * 1024 * 1024;

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// The node's durable store.
pub struct Store {
    db: Database,
    blobs: PathBuf,
}

/// Creates `data_dir` if needed and makes it the node's alone (0700): the store, archives and
/// cluster secret are in it, and tests the local runner runs as another uid must see nothing of
/// it. Done before a local runner starts too: the runner decides once, at start, which folders
/// its tests cannot search and must see through a mount namespace (environments under the data
/// directory among them), so the folder must already be private by then.
pub fn make_private(data_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    std::fs::set_permissions(data_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

impl Store {
    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        make_private(data_dir).map_err(io(data_dir))?;
        let blobs = data_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        // redb caches pages it has read or written up to this size: without a cap (1 GiB by
        // default) a node's memory grows with its history.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(data_dir.join("cdtester.redb"))
            .map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(EVALUATIONS).map_err(db_err)?;
        tx.open_table(RESULTS).map_err(db_err)?;
        tx.open_table(DURATIONS).map_err(db_err)?;
        tx.open_table(HISTORY).map_err(db_err)?;
        tx.open_table(MEMBERS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store { db, blobs })
    }

    /// Every stored evaluation record.
    pub fn load_evaluations(&self) -> Result<Vec<EvalRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(EVALUATIONS).map_err(db_err)?;
        let results = tx.open_table(RESULTS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let id = k.value();
            let mut rec: EvalRecord =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(id, e))?;
            for r in results.range((id, "")..(id + 1, "")).map_err(db_err)? {
                let (k, v) = r.map_err(db_err)?;
                let result = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(id, e))?;
                let task = k.value().1.parse().map_err(|e| StoreError::BadTask(id, e))?;
                rec.results.insert(task, result);
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// Writes an evaluation durably: its header (everything but the results) and the results
    /// named in `results` (the others are stored already).
    pub fn put_evaluation<'a>(
        &self,
        rec: &EvalRecord,
        results: impl IntoIterator<Item = &'a TaskId>,
    ) -> Result<(), StoreError> {
        let header = rec.header_json();
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(EVALUATIONS).map_err(db_err)?;
            table.insert(rec.id.get(), header.as_bytes()).map_err(db_err)?;
            let mut table = tx.open_table(RESULTS).map_err(db_err)?;
            let mut history = tx.open_table(HISTORY).map_err(db_err)?;
            for t in results {
                if let Some(r) = rec.results.get(t) {
                    let json = serde_json::to_vec(r).map_err(|e| StoreError::Corrupt(rec.id.get(), e))?;
                    table.insert((rec.id.get(), t.as_str()), json.as_slice()).map_err(db_err)?;
                    add_history(&mut history, rec, t, r)?;
                }
            }
        }
        tx.commit().map_err(db_err)
    }

    /// The recent runs of every test of projects named `project` (oldest run first), by node id;
    /// at most [`HISTORY_MAX_TESTS`] tests.
    pub fn history(&self, project: &str) -> Result<Vec<(String, Vec<TestRun>)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(HISTORY).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.range((project, "")..).map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (name, nodeid) = k.value();
            if name != project || out.len() >= HISTORY_MAX_TESTS {
                break;
            }
            // Written by this node: an unreadable row is skipped, not fatal.
            if let Ok(runs) = serde_json::from_slice::<Vec<TestRun>>(v.value()) {
                out.push((nodeid.to_string(), runs));
            }
        }
        Ok(out)
    }

    /// Every remembered module duration, by key.
    pub fn all_durations(&self) -> Result<Vec<(String, ModuleStat)>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(DURATIONS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (secs, tests) = v.value();
            out.push((k.value().to_string(), ModuleStat { secs, tests }));
        }
        Ok(out)
    }

    /// Remembers how long modules took and how many tests they have.
    pub fn record_durations(&self, entries: &[(String, ModuleStat)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(DURATIONS).map_err(db_err)?;
            for (k, stat) in entries {
                table.insert(k.as_str(), (stat.secs, stat.tests)).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// The members last remembered (addresses that do not parse are skipped).
    pub fn members(&self) -> Result<Vec<SocketAddr>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(MEMBERS).map_err(db_err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db_err)? {
            let (k, _) = row.map_err(db_err)?;
            match k.value().parse() {
                Ok(a) => out.push(a),
                Err(_) => tracing::warn!(member = k.value(), "ignoring a stored member that is no address"),
            }
        }
        Ok(out)
    }

    /// Replaces the remembered members.
    pub fn remember_members(&self, members: &[SocketAddr]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = tx.open_table(MEMBERS).map_err(db_err)?;
            table.retain(|_, ()| false).map_err(db_err)?;
            for m in members {
                table.insert(m.to_string().as_str(), ()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// Path of the blob with this content hash (it may not exist). Only a sha256 digest (64
    /// lowercase hex digits) names a blob: anything else could name another file.
    pub fn blob_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if !crate::eval::is_sha256_hex(sha256) {
            return Err(StoreError::BadHash);
        }
        Ok(self.blobs.join(format!("{sha256}.zip")))
    }

    /// Whether the blob is stored.
    pub fn has_blob(&self, sha256: &str) -> bool {
        self.blob_path(sha256).is_ok_and(|p| p.is_file())
    }

    /// Stores `bytes` under `sha256` (the caller has checked the hash). Idempotent.
    pub fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self.blob_path(sha256)?;
        if path.is_file() {
            return Ok(path);
        }
        let io = |source| StoreError::Io { path: path.clone(), source };
        let mut tmp = tempfile::NamedTempFile::new_in(&self.blobs).map_err(io)?;
        std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(path)
    }

    /// Reads a stored blob.
    pub fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(sha256)?;
        std::fs::read(&path).map_err(|source| StoreError::Io { path, source })
    }

    /// Deletes a stored blob (nothing if absent).
    pub fn remove_blob(&self, sha256: &str) -> Result<(), StoreError> {
        let path = self.blob_path(sha256)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// Stored blobs: (content hash, size in bytes, modified).
    pub fn blobs(&self) -> Vec<(String, u64, std::time::SystemTime)> {
        let Ok(dir) = std::fs::read_dir(&self.blobs) else { return Vec::new() };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let hash = name.strip_suffix(".zip").filter(|h| crate::eval::is_sha256_hex(h))?;
                let meta = e.metadata().ok()?;
                Some((hash.to_string(), meta.len(), meta.modified().ok()?))
            })
            .collect()
    }
}

/// Adds the runs a task's result holds to the history of its project's tests (once per
/// evaluation; the last [`HISTORY_KEEP`] runs are kept).
fn add_history(
    table: &mut redb::Table<(&str, &str), &[u8]>,
    rec: &EvalRecord,
    task: &TaskId,
    result: &ModuleResult,
) -> Result<(), StoreError> {
    let Some(project) = rec.project(task.project()) else { return Ok(()) };
    for t in result.report.tests.iter().filter(|t| t.nodeid.len() <= HISTORY_MAX_NODEID) {
        let key = (project.name.as_str(), t.nodeid.as_str());
        let mut runs: Vec<TestRun> = match table.get(key).map_err(db_err)? {
            Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
            None => Vec::new(),
        };
        if runs.iter().any(|r| r.eval == rec.id) {
            continue;
        }
        runs.push(TestRun { eval: rec.id, outcome: t.outcome, duration: t.duration, at: result.finished_at });
        runs.sort_by(|a, b| a.at.total_cmp(&b.at).then(a.eval.cmp(&b.eval)));
        let surplus = runs.len().saturating_sub(HISTORY_KEEP);
        runs.drain(..surplus);
        let json = serde_json::to_vec(&runs).map_err(|e| StoreError::Corrupt(rec.id.get(), e))?;
        table.insert(key, json.as_slice()).map_err(db_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_blobs_and_durations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut rec = EvalRecord::new(
                EvalId::test(42),
                crate::ids::NodeAddr::test("127.0.0.1:7000"),
                1.0,
                vec![crate::eval::tests::ready("42-0", "p", &["a.py", "b.py"])],
            );
            let report = crate::eval::tests::module_report("a.py", &[cdtester_runner_api::Outcome::Passed]);
            rec.add_result(
                &TaskId::test("42-0::a.py"),
                crate::eval::tests::result("127.0.0.1:7000", "x", report),
                2.0,
            );
            store.put_evaluation(&rec, []).unwrap();
            store.put_evaluation(&rec, rec.results.keys()).unwrap();
            let other =
                EvalRecord::new(EvalId::test(43), crate::ids::NodeAddr::test("127.0.0.1:7000"), 1.0, vec![]);
            store.put_evaluation(&other, []).unwrap();
            store.put_blob(&"ab".repeat(32), b"zipbytes").unwrap();
            assert!(matches!(store.put_blob("../../x", b"evil"), Err(StoreError::BadHash)));
            store
                .record_durations(&[("p::tests/test_a.py".into(), ModuleStat { secs: 2.5, tests: 7 })])
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let evals = store.load_evaluations().unwrap();
        assert_eq!(evals.len(), 2);
        assert_eq!(evals[0].id, EvalId::test(42));
        assert_eq!(evals[0].results.len(), 1);
        assert_eq!(evals[0].counts().passed, 1);
        assert!(evals[1].results.is_empty());
        let hash = "ab".repeat(32);
        assert!(store.has_blob(&hash));
        assert_eq!(store.read_blob(&hash).unwrap(), b"zipbytes");
        assert_eq!(store.blobs().len(), 1);
        store.remove_blob(&hash).unwrap();
        assert!(!store.has_blob(&hash) && !store.has_blob("/etc/passwd"));
        assert_eq!(
            store.all_durations().unwrap(),
            vec![("p::tests/test_a.py".to_string(), ModuleStat { secs: 2.5, tests: 7 })]
        );
    }

    #[test]
    fn history_keeps_the_last_runs_of_each_test_per_project_name_once_per_evaluation() {
        use cdtester_runner_api::Outcome::{Failed, Passed};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for id in 1..=(HISTORY_KEEP as u64 + 2) {
            let project = crate::eval::tests::ready(&format!("{id}-0"), "calc", &["a.py"]);
            let other = crate::eval::tests::ready(&format!("{id}-1"), "calculator", &["a.py"]);
            let mut rec = EvalRecord::new(
                EvalId::test(id),
                crate::ids::NodeAddr::test("127.0.0.1:7000"),
                1.0,
                vec![project, other],
            );
            let outcome = if id % 2 == 0 { Passed } else { Failed };
            for pid in [format!("{id}-0"), format!("{id}-1")] {
                let mut r = crate::eval::tests::result(
                    "127.0.0.1:7000",
                    "x",
                    crate::eval::tests::module_report("a.py", &[outcome]),
                );
                r.finished_at = id as f64;
                rec.add_result(&TaskId::test(&format!("{pid}::a.py")), r, id as f64);
            }
            store.put_evaluation(&rec, rec.results.keys()).unwrap();
            store.put_evaluation(&rec, rec.results.keys()).unwrap();
        }
        let h = store.history("calc").unwrap();
        assert_eq!(h.len(), 1, "{h:?}");
        let (nodeid, runs) = &h[0];
        assert_eq!(nodeid, "a.py::test_0");
        let evals: Vec<u64> = runs.iter().map(|r| r.eval.get()).collect();
        assert_eq!(evals, (3..=HISTORY_KEEP as u64 + 2).collect::<Vec<_>>(), "the last runs, each once");
        assert_eq!(runs.last().map(|r| r.outcome), Some(Passed));
        assert_eq!(store.history("calculator").unwrap().len(), 1);
        assert!(store.history("cal").unwrap().is_empty());
    }
}
