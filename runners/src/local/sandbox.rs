//! What confines the local runner's test processes (collection and module runs, fresh or forked
//! from the warm worker):
//!
//! - a cleared environment with a short allow-list ([`test_env`], [`TaskDir::env`]): nothing of
//!   the node's own environment (no `CDT_*` settings, no secret) reaches a test;
//! - their own session and process group (`setsid`), so they are not in the node's session;
//! - `setrlimit` limits: CPU seconds (from the run's timeout), file size, open files, processes;
//! - when the node runs as root, an unprivileged uid/gid (default 65534, `nobody`/`nogroup`), so
//!   a test cannot signal the node, its warm worker or anything else of root's. The project is
//!   then run from a copy owned by that uid (the node's own tree stays untouched), and every run
//!   gets a fresh HOME and TMPDIR owned by it. When the interpreter or the environment cache lies
//!   under a folder that uid may not search (a pyenv Python in `/root`), test processes get their
//!   own mount namespace in which that folder is a small empty tmpfs holding only bind mounts of
//!   what they need ([`MountPlan`]): same paths, nothing else of the folder visible.
//!
//! This is not a sandbox against a kernel exploit, and tests of different projects share the one
//! uid; use the `docker` runner for hostile code.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::Duration;

use cdtester_runner_api::Rlimits;
use tempfile::TempDir;

use super::LocalError;

/// Uid and gid tests run as by default when the node is root (`nobody`, `nogroup`).
pub const DEFAULT_UNPRIVILEGED_ID: u32 = 65534;
/// Extra CPU seconds past the wall-clock timeout before `RLIMIT_CPU` stops a process.
const CPU_SLACK_S: u64 = 5;
/// Largest plugin record file the runner reads back (a test could grow it up to `fsize_mib`).
const MAX_RECORDS_BYTES: u64 = 64 << 20;

/// Credentials a test process drops to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ident {
    pub uid: u32,
    pub gid: u32,
}

/// One resource limit: its name in Python's `resource` module (after `RLIMIT_`), soft and hard.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit {
    name: &'static str,
    resource: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
}

/// Folders the tests' uid may not search, each replaced (in the test processes' own mount
/// namespace) by an empty tmpfs holding bind mounts of the paths below it they need.
#[derive(Debug, Default)]
pub(crate) struct MountPlan {
    /// An empty root-owned folder where each tmpfs is assembled before it is moved into place.
    stage: Option<CString>,
    covers: Vec<Cover>,
}

#[derive(Debug)]
struct Cover {
    /// The folder hidden by the tmpfs.
    at: CString,
    /// Folders to create in the staged tmpfs, parents first.
    dirs: Vec<CString>,
    /// (host path, its place in the staged tmpfs) to bind.
    binds: Vec<(CString, CString)>,
}

impl MountPlan {
    /// The plan that makes every path of `needed` (with its contents) reachable by `id`.
    fn for_paths(needed: &[PathBuf], id: Ident, stage: &Path) -> std::io::Result<MountPlan> {
        let mut covers: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
        for path in needed {
            let Some(blocked) = first_unsearchable_ancestor(path, id)? else { continue };
            match covers.iter_mut().find(|(at, _)| *at == blocked) {
                Some((_, keep)) => keep.push(path.clone()),
                None => covers.push((blocked, vec![path.clone()])),
            }
        }
        if covers.is_empty() {
            return Ok(MountPlan::default());
        }
        let mut plan = MountPlan { stage: Some(c_path(stage)?), covers: Vec::new() };
        for (at, keep) in covers {
            let mut dirs = Vec::new();
            let mut binds = Vec::new();
            for path in keep {
                let rel = path.strip_prefix(&at).map_err(std::io::Error::other)?;
                let mut inner = stage.to_path_buf();
                for part in rel.components() {
                    inner.push(part);
                    let c = c_path(&inner)?;
                    if !dirs.contains(&c) {
                        dirs.push(c);
                    }
                }
                binds.push((c_path(&path)?, c_path(&inner)?));
            }
            plan.covers.push(Cover { at: c_path(&at)?, dirs, binds });
        }
        Ok(plan)
    }

    /// In the forked child, before exec: a private mount namespace with every cover in place.
    /// Only async-signal-safe system calls on data prepared before the fork.
    fn enter(&self) -> std::io::Result<()> {
        let Some(stage) = &self.stage else { return Ok(()) };
        let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: plain system calls on NUL-terminated strings owned by `self`.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
            for cover in &self.covers {
                let opts = c"mode=0755,size=1m";
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    stage.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    opts.as_ptr().cast(),
                ))?;
                for dir in &cover.dirs {
                    check(libc::mkdir(dir.as_ptr(), 0o755))?;
                }
                for (from, to) in &cover.binds {
                    check(libc::mount(
                        from.as_ptr(),
                        to.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                }
                check(libc::mount(stage.as_ptr(), cover.at.as_ptr(), null, libc::MS_MOVE, std::ptr::null()))?;
            }
        }
        Ok(())
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// The highest folder above `path` that `id` (without supplementary groups) may not search.
fn first_unsearchable_ancestor(path: &Path, id: Ident) -> std::io::Result<Option<PathBuf>> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let meta = std::fs::metadata(dir)?;
        let bit = if meta.uid() == id.uid {
            0o100
        } else if meta.gid() == id.gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            return Ok(Some(dir.to_path_buf()));
        }
    }
    Ok(None)
}

/// How one process is confined: always its own session; a mount namespace when tests need one;
/// for tests also limits and credentials.
#[derive(Debug, Clone, Default)]
pub(crate) struct Confinement {
    pub ident: Option<Ident>,
    pub limits: Vec<Limit>,
    pub mounts: Arc<MountPlan>,
}

impl Confinement {
    /// Makes `cmd` start in its mount namespace (if any), in a new session, with these limits,
    /// then with these credentials and no supplementary groups.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        let limits: Vec<(libc::__rlimit_resource_t, libc::rlimit)> = self
            .limits
            .iter()
            .map(|l| (l.resource, libc::rlimit { rlim_cur: l.soft, rlim_max: l.hard }))
            .collect();
        let (mounts, ident) = (Arc::clone(&self.mounts), self.ident);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                mounts.enter()?;
                let check =
                    |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for (resource, limit) in &limits {
                    check(libc::setrlimit(*resource, limit))?;
                }
                if let Some(id) = ident {
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setresgid(id.gid, id.gid, id.gid))?;
                    check(libc::setresuid(id.uid, id.uid, id.uid))?;
                }
                Ok(())
            });
        }
    }

    /// The fields of a warm worker request that make its child confine itself the same way.
    pub(crate) fn request_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        if let Some(id) = self.ident {
            fields.insert("uid".into(), id.uid.into());
            fields.insert("gid".into(), id.gid.into());
        }
        let limits: serde_json::Map<String, serde_json::Value> =
            self.limits.iter().map(|l| (l.name.to_string(), serde_json::json!([l.soft, l.hard]))).collect();
        fields.insert("rlimits".into(), limits.into());
        fields
    }
}

/// The local runner's confinement settings and its private work area (project copies and
/// per-run directories, removed with the runner).
pub(crate) struct Sandbox {
    ident: Option<Ident>,
    rlimits: Rlimits,
    work: TempDir,
    mounts: Arc<MountPlan>,
}

static NOT_ROOT: Once = Once::new();

impl Sandbox {
    pub(crate) fn new(uid: Option<u32>, gid: Option<u32>, rlimits: Rlimits) -> Result<Sandbox, LocalError> {
        // SAFETY: plain syscalls without arguments.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let ident = if euid == 0 {
            let ident = Ident {
                uid: uid.unwrap_or(DEFAULT_UNPRIVILEGED_ID),
                gid: gid.unwrap_or(DEFAULT_UNPRIVILEGED_ID),
            };
            if ident.uid == 0 || ident.gid == 0 {
                return Err(LocalError::Env("runner.local.uid and gid must not be 0".into()));
            }
            Some(ident)
        } else {
            NOT_ROOT.call_once(|| {
                tracing::info!(
                    uid = euid,
                    gid = egid,
                    "the node is not root: local tests keep its uid (no privilege drop; runner.local.uid/gid unused)"
                );
            });
            None
        };
        let work = tempfile::Builder::new().prefix("cdt-local-").tempdir()?;
        // Others may pass through (to their own task and project folders) but not list it.
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o711))?;
        Ok(Sandbox { ident, rlimits, work, mounts: Arc::default() })
    }

    /// Makes `needed` (and what is below) reachable by the tests' uid: where a folder above one
    /// of them is not searchable by it, test processes get a mount namespace that shows them
    /// only these paths there (see [`MountPlan`]).
    pub(crate) fn expose(&mut self, needed: &[PathBuf]) -> std::io::Result<()> {
        let Some(id) = self.ident else { return Ok(()) };
        let mut needed = needed.to_vec();
        needed.sort();
        needed.dedup();
        // Keep only the outermost paths: binding one brings along everything below it.
        let outer: Vec<PathBuf> =
            needed.iter().filter(|p| !needed.iter().any(|q| q != *p && p.starts_with(q))).cloned().collect();
        let stage = self.work.path().join(".mnt");
        std::fs::create_dir_all(&stage)?;
        let plan = MountPlan::for_paths(&outer, id, &stage)?;
        if !plan.covers.is_empty() {
            let hidden: Vec<String> =
                plan.covers.iter().map(|c| c.at.to_string_lossy().into_owned()).collect();
            tracing::info!(
                ?hidden,
                uid = id.uid,
                "tests get a mount namespace: these folders are not searchable by their uid, so they \
                 see only the interpreter and environments there"
            );
        }
        self.mounts = Arc::new(plan);
        Ok(())
    }

    /// The confinement of the warm worker: the tests' mount namespace and a session of its own,
    /// but the node's uid and no limits (its children confine themselves further).
    pub(crate) fn server_confinement(&self) -> Confinement {
        Confinement { ident: None, limits: Vec::new(), mounts: Arc::clone(&self.mounts) }
    }

    /// The runner's work area (must be reachable by the tests' uid).
    pub(crate) fn work(&self) -> &Path {
        self.work.path()
    }

    /// The confinement of a test process whose run may last `timeout`: limits (never above the
    /// node's own hard limits) and credentials.
    pub(crate) fn confinement(&self, timeout: Duration) -> Confinement {
        let r = &self.rlimits;
        let cpu = r.cpu_s.unwrap_or(timeout.as_secs().saturating_add(CPU_SLACK_S)).max(1);
        let wanted = [
            ("cpu", libc::RLIMIT_CPU, cpu, cpu.saturating_add(CPU_SLACK_S)),
            (
                "fsize",
                libc::RLIMIT_FSIZE,
                r.fsize_mib.saturating_mul(1 << 20),
                r.fsize_mib.saturating_mul(1 << 20),
            ),
            ("nofile", libc::RLIMIT_NOFILE, r.nofile, r.nofile),
            ("nproc", libc::RLIMIT_NPROC, r.nproc, r.nproc),
        ];
        let limits = wanted
            .into_iter()
            .map(|(name, resource, soft, hard)| {
                let hard = hard.min(current_hard(resource));
                Limit { name, resource, soft: soft.min(hard), hard }
            })
            .collect();
        Confinement { ident: self.ident, limits, mounts: Arc::clone(&self.mounts) }
    }

    /// A fresh directory for one run: HOME, TMPDIR and the plugin's record file, owned by the
    /// tests' uid inside a folder only root may change (so a test cannot plant links there).
    pub(crate) fn task_dir(&self) -> std::io::Result<TaskDir> {
        let dir = tempfile::Builder::new().prefix("run-").tempdir_in(self.work.path())?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        let task = TaskDir { dir };
        std::fs::create_dir(task.home())?;
        std::fs::create_dir(task.tmp())?;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(task.records())?;
        if let Some(id) = self.ident {
            for path in [task.home(), task.tmp(), task.records()] {
                std::os::unix::fs::chown(&path, Some(id.uid), Some(id.gid))?;
            }
        }
        Ok(task)
    }

    /// A private copy of the project at `root`, owned by the tests' uid, when tests run as
    /// another uid (`None`: they run in `root` itself).
    pub(crate) fn project_copy(&self, root: &Path) -> std::io::Result<Option<TempDir>> {
        let Some(id) = self.ident else { return Ok(None) };
        let copy = tempfile::Builder::new().prefix("project-").tempdir_in(self.work.path())?;
        super::env::copy_tree(root, copy.path())?;
        chown_tree(copy.path(), id)?;
        Ok(Some(copy))
    }
}

/// One run's directory (removed when dropped).
pub(crate) struct TaskDir {
    dir: TempDir,
}

impl TaskDir {
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// The file the reporting plugin appends its records to.
    pub(crate) fn records(&self) -> PathBuf {
        self.dir.path().join("records.jsonl")
    }

    /// What the run adds to [`test_env`]: its own HOME and TMPDIR.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.home().to_string_lossy().into_owned()),
            ("TMPDIR".into(), self.tmp().to_string_lossy().into_owned()),
        ]
    }

    /// The plugin's records, at most [`MAX_RECORDS_BYTES`] (the file is the test's to write).
    pub(crate) fn read_records(&self) -> std::io::Result<String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.records())?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("the record file is not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(MAX_RECORDS_BYTES).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The whole environment of a test process, before the run's own HOME and TMPDIR: the
/// interpreter's `bin` first on a minimal PATH, a UTF-8 locale, no bytecode files in the project,
/// and the runner's support folder (reporting plugin) on `PYTHONPATH`.
pub(crate) fn test_env(python: &Path, support: &Path) -> Vec<(String, String)> {
    let bin = python.parent().map(|b| format!("{}:", b.display())).unwrap_or_default();
    vec![
        ("PATH".into(), format!("{bin}/usr/bin:/bin")),
        ("LANG".into(), "C.UTF-8".into()),
        ("LC_ALL".into(), "C.UTF-8".into()),
        ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
        ("PYTHONPATH".into(), support.to_string_lossy().into_owned()),
    ]
}

fn current_hard(resource: libc::__rlimit_resource_t) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(resource, &mut lim) } == 0 { lim.rlim_max } else { libc::RLIM_INFINITY }
}

/// Gives `dir` and everything under it (never following links) to `id`. Only for trees this
/// runner has just created itself.
fn chown_tree(dir: &Path, id: Ident) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(id.uid), Some(id.gid))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path(), id)?;
        } else {
            std::os::unix::fs::lchown(entry.path(), Some(id.uid), Some(id.gid))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_timeout_and_never_exceed_the_hard_limits() {
        let sandbox = Sandbox::new(None, None, Rlimits::default()).unwrap();
        let c = sandbox.confinement(Duration::from_secs(30));
        let cpu = c.limits.iter().find(|l| l.name == "cpu").unwrap();
        assert_eq!(cpu.soft, 35u64.min(current_hard(libc::RLIMIT_CPU)));
        for l in &c.limits {
            assert!(l.soft <= l.hard && l.hard <= current_hard(l.resource), "{l:?}");
        }
        let fields = c.request_fields();
        assert_eq!(fields["rlimits"]["nofile"][0], 1024u64.min(current_hard(libc::RLIMIT_NOFILE)));
    }

    #[test]
    fn uid_zero_is_refused_when_root() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        assert!(Sandbox::new(Some(0), None, Rlimits::default()).is_err());
        let s = Sandbox::new(None, None, Rlimits::default()).unwrap();
        assert_eq!(s.ident, Some(Ident { uid: 65534, gid: 65534 }));
    }

    #[test]
    fn a_folder_the_uid_cannot_search_shows_tests_only_what_they_need() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let private = tempfile::tempdir().unwrap();
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let needed = private.path().join("a/needed");
        std::fs::create_dir_all(&needed).unwrap();
        std::fs::write(needed.join("file"), "visible").unwrap();
        std::fs::write(private.path().join("secret"), "hidden").unwrap();
        let mut s = Sandbox::new(None, None, Rlimits::default()).unwrap();
        let id = s.ident.unwrap();
        assert_eq!(first_unsearchable_ancestor(&needed, id).unwrap().as_deref(), Some(private.path()));
        s.expose(std::slice::from_ref(&needed)).unwrap();
        let script = format!(
            "cat {}/file; echo; cat {}/secret 2>/dev/null || echo no-secret; id -u",
            needed.display(),
            private.path().display()
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script]).current_dir("/");
        s.confinement(Duration::from_secs(10)).apply(&mut cmd);
        let out = cmd.output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "visible\nno-secret\n65534\n", "{out:?}");
        // The node's own view is unchanged.
        assert_eq!(std::fs::read_to_string(private.path().join("secret")).unwrap(), "hidden");
    }

    #[test]
    fn a_run_directory_is_owned_by_the_tests_uid_inside_a_root_folder() {
        use std::os::unix::fs::MetadataExt;
        let s = Sandbox::new(None, None, Rlimits::default()).unwrap();
        let task = s.task_dir().unwrap();
        // SAFETY: plain syscall.
        let uid = s.ident.map_or_else(|| unsafe { libc::geteuid() }, |i| i.uid);
        for path in [task.home(), task.tmp(), task.records()] {
            assert_eq!(std::fs::metadata(&path).unwrap().uid(), uid, "{}", path.display());
        }
        let env = task.env();
        assert!(env.iter().any(|(k, v)| k == "HOME" && v.ends_with("home")));
        assert_eq!(task.read_records().unwrap(), "");
    }
}
