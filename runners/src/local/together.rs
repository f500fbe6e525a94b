//! Sharing one pytest session among a project's small modules, only where it provably changes
//! nothing: the memory of what each module of a project (by content hash) counted when run alone.
//!
//! Every module run alone (whole, not a chunk) is remembered here with its counts and wall time.
//! When a project with exactly the same content is discovered again and every one of its modules
//! is remembered, cheap (at most [`MAX_MODULE_SECS`] alone, [`MAX_TOTAL_SECS`] in all) and not
//! known to differ together, the runner runs the whole project in one forked session instead of
//! a collect-only pass, and keeps each module's report only if the session collected exactly the
//! remembered modules and every module counted exactly what it counted alone; otherwise it throws
//! the session away, remembers that this project differs together, and runs modules alone as
//! usual. A task naming several whole modules (a group the scheduler formed) is run the same way
//! over just its modules; a group that counts differently makes its modules run alone from then
//! on (the rest of the project may still share). The memory is a JSON file next to the
//! environments (`alone-counts.json`), written when a project is released, holding at most
//! [`MAX_PROJECTS`] projects (least recently seen out).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use cdtester_runner_api::Counts;
use serde::{Deserialize, Serialize};

/// Longest remembered alone run of a module that may share a session.
pub(crate) const MAX_MODULE_SECS: f64 = 1.0;
/// Longest remembered alone time of a whole project that may share a session.
pub(crate) const MAX_TOTAL_SECS: f64 = 10.0;
/// Projects remembered at most.
const MAX_PROJECTS: usize = 20_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Project {
    /// Module -> counts and wall seconds when run alone.
    modules: BTreeMap<String, (Counts, f64)>,
    /// The whole project once counted differently in one session: never again as a whole.
    #[serde(default)]
    differs: bool,
    /// Modules of a group that once counted differently together: they run alone.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    loners: BTreeSet<String>,
    /// Unix seconds of the last use.
    seen: u64,
}

/// Run-alone counts per project content hash and module.
pub(crate) struct AloneMemory {
    path: PathBuf,
    data: Mutex<HashMap<String, Project>>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AloneMemory {
    /// The memory kept in `dir` (an unreadable file is ignored).
    pub(crate) fn open(dir: &Path) -> AloneMemory {
        let path = dir.join("alone-counts.json");
        let data =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        AloneMemory { path, data: Mutex::new(data) }
    }

    /// The remembered counts of every module of the project with content `hash`, when it may
    /// share a session (see the module documentation).
    pub(crate) fn shareable(&self, hash: &str) -> Option<BTreeMap<String, Counts>> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let p = data.get_mut(hash)?;
        p.seen = now();
        let total: f64 = p.modules.values().map(|(_, s)| s).sum();
        let cheap = p.modules.values().all(|(_, s)| *s <= MAX_MODULE_SECS) && total <= MAX_TOTAL_SECS;
        (!p.differs && p.loners.is_empty() && p.modules.len() > 1 && cheap)
            .then(|| p.modules.iter().map(|(m, (c, _))| (m.clone(), *c)).collect())
    }

    /// The remembered alone counts of those of `modules` (a task that names several: the
    /// scheduler bounded their remembered time already) that may share a session: every one of
    /// them must have run alone before, and those that once counted differently in a group are
    /// left out; `None` when fewer than two remain.
    pub(crate) fn counts_of(&self, hash: &str, modules: &[String]) -> Option<BTreeMap<String, Counts>> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let p = data.get_mut(hash)?;
        p.seen = now();
        let known: BTreeMap<String, Counts> = modules
            .iter()
            .filter(|m| !p.loners.contains(*m))
            .map(|m| p.modules.get(m).map(|(c, _)| (m.clone(), *c)))
            .collect::<Option<_>>()?;
        (known.len() > 1).then_some(known)
    }

    /// Remembers that `modules` of project `hash` counted differently in one session: each runs
    /// alone from now on, and the project never shares one session as a whole.
    pub(crate) fn mark_loners<'a>(&self, hash: &str, modules: impl IntoIterator<Item = &'a String>) {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let p = data.entry(hash.to_string()).or_default();
        p.loners.extend(modules.into_iter().cloned());
    }

    /// Remembers what `module` of project `hash` counted alone in `secs`.
    pub(crate) fn record(&self, hash: &str, module: &str, counts: Counts, secs: f64) {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let p = data.entry(hash.to_string()).or_default();
        p.seen = now();
        p.modules.insert(module.to_string(), (counts, secs));
    }

    /// Remembers that project `hash` as a whole counts differently in one session (its groups
    /// still may not).
    pub(crate) fn mark_differs(&self, hash: &str) {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).entry(hash.to_string()).or_default().differs =
            true;
    }

    /// Writes the memory to its file (atomically; under the lock, so concurrent saves of this
    /// process cannot interleave), dropping the least recently seen projects beyond
    /// [`MAX_PROJECTS`].
    pub(crate) fn save(&self) -> std::io::Result<()> {
        let mut data = self.data.lock().unwrap_or_else(|e| e.into_inner());
        if data.len() > MAX_PROJECTS {
            let mut seen: Vec<u64> = data.values().map(|p| p.seen).collect();
            seen.sort_unstable();
            let cut = seen[data.len() - MAX_PROJECTS];
            data.retain(|_, p| p.seen >= cut);
        }
        let bytes = serde_json::to_vec(&*data).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        // Tests can reach the environments' folder: they must not read other projects' counts.
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(&bytes)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(passed: u64, failed: u64) -> Counts {
        Counts { passed, failed, ..Counts::default() }
    }

    #[test]
    fn only_cheap_fully_known_projects_that_never_differed_share_a_session() {
        let dir = tempfile::tempdir().unwrap();
        let m = AloneMemory::open(dir.path());
        assert!(m.shareable("h").is_none());
        m.record("h", "a.py", counts(3, 1), 0.2);
        assert!(m.shareable("h").is_none(), "one module: nothing to share");
        m.record("h", "b.py", counts(2, 0), 0.3);
        let known = m.shareable("h").unwrap();
        assert_eq!(known["a.py"], counts(3, 1));
        m.save().unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("alone-counts.json")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "only the runner's user reads it");
        let again = AloneMemory::open(dir.path());
        assert_eq!(again.shareable("h").unwrap(), known, "kept in its file");
        again.record("h", "c.py", counts(1, 0), MAX_MODULE_SECS + 0.1);
        assert!(again.shareable("h").is_none(), "a slow module runs alone");
        m.mark_differs("h");
        assert!(m.shareable("h").is_none());
    }

    #[test]
    fn a_task_of_several_modules_shares_only_what_is_all_remembered_and_never_differed() {
        let dir = tempfile::tempdir().unwrap();
        let m = AloneMemory::open(dir.path());
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(m.counts_of("h", &names(&["a.py", "b.py"])).is_none(), "unknown project");
        m.record("h", "a.py", counts(3, 1), 0.2);
        m.record("h", "b.py", counts(2, 0), 5.0);
        m.record("h", "c.py", counts(1, 0), 0.1);
        assert!(m.counts_of("h", &names(&["a.py", "d.py"])).is_none(), "d.py never ran alone");
        let known = m.counts_of("h", &names(&["b.py", "a.py"])).unwrap();
        assert_eq!(known.keys().collect::<Vec<_>>(), ["a.py", "b.py"], "only the task's modules");
        assert_eq!(known["b.py"], counts(2, 0), "no time cap: the scheduler bounded the task");
        m.mark_differs("h");
        assert!(
            m.counts_of("h", &names(&["a.py", "c.py"])).is_some(),
            "the whole project differing says nothing of a group"
        );
        m.record("h", "d.py", counts(1, 1), 0.1);
        m.mark_loners("h", &names(&["a.py", "b.py"]));
        let left = m.counts_of("h", &names(&["a.py", "b.py", "c.py", "d.py"])).unwrap();
        assert_eq!(
            left.keys().collect::<Vec<_>>(),
            ["c.py", "d.py"],
            "modules of a differing group run alone"
        );
        assert!(m.counts_of("h", &names(&["a.py", "c.py"])).is_none(), "one module left: nothing to share");
        assert!(m.shareable("h").is_none());
    }
}
