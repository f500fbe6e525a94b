//! Python environments for the local runner.
//!
//! One cached *base* virtualenv per interpreter holds pytest (pinned). A project that needs more
//! (its own install because of a src layout, or extra requirements) gets a small *project*
//! virtualenv made without pip, whose `cdtester_base.pth` puts the base's site-packages on
//! `sys.path`; pip (run from the base with `--python`) then installs only what is missing. Project
//! environments are keyed by a hash of what they contain, so modules and later runs reuse them.
//! Both are built in a temporary directory and renamed into place, so concurrent builders (threads
//! or processes) never see a half-made environment.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use cdtester_runner_api::requirement::{self, Requirement};
use sha2::{Digest, Sha256};

use super::LocalError;
use super::sandbox::Confinement;
use crate::wheelhouse::PackageSource;

/// The pytest every environment gets (the corpus expectations were measured with it).
pub const PYTEST_REQUIREMENT: &str = "pytest==9.2.0";
const READY_MARKER: &str = ".cdtester-ready";

/// Directory names that runs themselves create; they never count as project content.
const GENERATED_DIRS: &[&str] = &["__pycache__", ".hypothesis", ".pytest_cache", ".git", ".tox", ".nox"];

pub(crate) struct EnvManager {
    python: PathBuf,
    /// The interpreter's `sys.version` (part of the base environment's key).
    version: String,
    dir: PathBuf,
    source: PackageSource,
    base: Mutex<Option<PathBuf>>,
}

impl EnvManager {
    pub(crate) fn new(python: &Interpreter, dir: PathBuf, source: PackageSource) -> EnvManager {
        let (version, python) = (python.version.clone(), python.executable.clone());
        EnvManager { python, version, dir, source, base: Mutex::new(None) }
    }

    /// A failed build's error, with what to do when pip could not reach its packages.
    fn explained(&self, e: LocalError) -> LocalError {
        match e {
            LocalError::Env(message) => LocalError::Env(self.source.explain(message)),
            other => other,
        }
    }

    /// Where the base environment of this interpreter and pytest is (or will be).
    fn base_dir(&self) -> PathBuf {
        let key = short_hash(&[
            self.python.to_string_lossy().as_bytes(),
            self.version.as_bytes(),
            PYTEST_REQUIREMENT.as_bytes(),
        ]);
        self.dir.join(format!("base-{key}"))
    }

    /// The base environment's directory when it is built already (nothing is built here).
    pub(crate) fn base_if_built(&self) -> Option<PathBuf> {
        let dir = self.base_dir();
        dir.join(READY_MARKER).is_file().then_some(dir)
    }

    /// The base environment's directory, built on first use.
    pub(crate) fn base(&self) -> Result<PathBuf, LocalError> {
        let mut guard = self.base.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = guard.as_ref() {
            return Ok(b.clone());
        }
        let final_dir = self.base_dir();
        if !final_dir.join(READY_MARKER).is_file() {
            tracing::info!(dir = %final_dir.display(), "building the base Python environment ({PYTEST_REQUIREMENT})");
            let python = self.python.clone();
            let source = self.source.pip_args();
            build_atomically(&final_dir, |tmp| {
                run_checked(Command::new(&python).arg("-m").arg("venv").arg(tmp))?;
                run_checked(
                    Command::new(venv_python(tmp))
                        .args(pip_install_args())
                        .args(&source)
                        .arg(PYTEST_REQUIREMENT),
                )
            })
            .map_err(|e| self.explained(e))?;
        }
        *guard = Some(final_dir.clone());
        Ok(final_dir)
    }

    /// The environment for a project: the base itself when nothing is needed, otherwise a
    /// project environment with `requirements` and (when `install_from` is set) the project.
    pub(crate) fn project(
        &self,
        requirements: &[String],
        install_from: Option<(&Path, &str)>,
    ) -> Result<PathBuf, LocalError> {
        // Strict PEP 508 only (no URL, path or pip option), in canonical form, after `--`.
        let mut reqs: Vec<String> =
            requirement::parse_all(requirements)?.iter().map(Requirement::to_string).collect();
        reqs.sort();
        reqs.dedup();
        let base = self.base()?;
        if reqs.is_empty() && install_from.is_none() {
            return Ok(base);
        }
        let mut parts: Vec<&[u8]> = vec![base.as_os_str().as_encoded_bytes()];
        parts.extend(reqs.iter().map(|r| r.as_bytes()));
        if let Some((_, hash)) = install_from {
            parts.push(b"install");
            parts.push(hash.as_bytes());
        }
        let final_dir = self.dir.join(format!("proj-{}", short_hash(&parts)));
        if final_dir.join(READY_MARKER).is_file() {
            return Ok(final_dir);
        }
        tracing::info!(dir = %final_dir.display(), ?reqs, install = install_from.is_some(), "building a project environment");
        let base_python = venv_python(&base);
        let base_site = site_packages(&base)?;
        build_atomically(&final_dir, |tmp| {
            run_checked(Command::new(&self.python).args(["-m", "venv", "--without-pip"]).arg(tmp))?;
            std::fs::write(
                site_packages(tmp)?.join("cdtester_base.pth"),
                format!("{}\n", base_site.display()),
            )?;
            let constraints = tmp.join("cdtester-constraints.txt");
            std::fs::write(&constraints, format!("{PYTEST_REQUIREMENT}\n"))?;
            let pip = |args: &[&std::ffi::OsStr]| -> Result<(), LocalError> {
                let mut cmd = Command::new(&base_python);
                cmd.args(["-m", "pip", "--python"]).arg(venv_python(tmp));
                cmd.args(["install", "--quiet", "--disable-pip-version-check"]);
                cmd.args(self.source.pip_args()).args(args);
                run_checked(&mut cmd)
            };
            if !reqs.is_empty() {
                let mut args: Vec<&std::ffi::OsStr> =
                    vec!["-c".as_ref(), constraints.as_os_str(), "--".as_ref()];
                args.extend(reqs.iter().map(|r| std::ffi::OsStr::new(r.as_str())));
                pip(&args)?;
            }
            if let Some((root, _)) = install_from {
                // pip builds setuptools projects in-tree (build/, *.egg-info): build from a copy.
                let copy = tempfile::Builder::new().prefix("cdt-install-").tempdir_in(&self.dir)?;
                copy_tree(root, copy.path())?;
                pip(&["--no-deps".as_ref(), "--".as_ref(), copy.path().as_os_str()])?;
            }
            Ok(())
        })
        .map_err(|e| self.explained(e))?;
        Ok(final_dir)
    }
}

/// The interpreter of a virtualenv.
pub(crate) fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

fn site_packages(venv: &Path) -> Result<PathBuf, LocalError> {
    let lib = venv.join("lib");
    for entry in std::fs::read_dir(&lib)? {
        let path = entry?.path().join("site-packages");
        if path.is_dir() {
            return Ok(path);
        }
    }
    Err(LocalError::Env(format!("no site-packages under {}", lib.display())))
}

fn pip_install_args() -> [&'static str; 5] {
    ["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
}

/// Builds `final_dir` by running `build` on a fresh sibling temporary directory, then renaming it
/// into place. If another builder won the race, its result is kept.
fn build_atomically(
    final_dir: &Path,
    build: impl FnOnce(&Path) -> Result<(), LocalError>,
) -> Result<(), LocalError> {
    let parent =
        final_dir.parent().ok_or_else(|| LocalError::Env(format!("bad env dir {}", final_dir.display())))?;
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new().prefix(".building-").tempdir_in(parent)?;
    let work = tmp.path().join("env");
    build(&work)?;
    std::fs::write(work.join(READY_MARKER), b"")?;
    match std::fs::rename(&work, final_dir) {
        Ok(()) => Ok(()),
        Err(_) if final_dir.join(READY_MARKER).is_file() => Ok(()),
        Err(e) => {
            // A stale, unfinished directory from a killed builder: replace it.
            if final_dir.exists() {
                std::fs::remove_dir_all(final_dir)?;
                std::fs::rename(&work, final_dir)?;
                Ok(())
            } else {
                Err(e.into())
            }
        }
    }
}

/// The environment of the commands that build environments (venv, pip): what they need to find
/// programs and reach a package index (locale, proxies, `PIP_*` settings, CA bundles), nothing
/// else of the node's (no `CDT_*` settings, no secret), since a project's build backend runs there.
fn build_env() -> impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> {
    const KEEP: &[&str] = &[
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
    ];
    std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| KEEP.contains(&k) || k.starts_with("PIP_")))
}

/// `cmd` with only [`build_env`] and stdin from /dev/null.
fn build_command(cmd: &mut Command) -> &mut Command {
    cmd.env_clear().envs(build_env()).stdin(Stdio::null())
}

fn run_checked(cmd: &mut Command) -> Result<(), LocalError> {
    command_output(cmd).map(drop)
}

/// Runs `cmd` (see [`build_command`]) and returns its trimmed stdout; on failure the error names
/// the program and its arguments (never its environment) and ends with its output.
fn command_output(cmd: &mut Command) -> Result<String, LocalError> {
    let out = build_command(cmd).output()?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let mut shown = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    Err(LocalError::Env(format!("{shown} failed ({}): {}", out.status, tail(&text, 2000))))
}

/// The last `max` bytes of `text` (on a character boundary).
pub(crate) fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..8])
}

fn skipped(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| GENERATED_DIRS.contains(&n))
}

/// Hex sha256 of a project's files (relative paths and contents, in sorted order), ignoring what
/// test runs generate (`__pycache__`, `.hypothesis`, ...). Symlinks are hashed as their target path.
pub fn content_hash(root: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_dir(root, root, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn hash_dir(root: &Path, dir: &Path, h: &mut Sha256) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if skipped(&e.file_name()) {
            continue;
        }
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        let ft = e.file_type()?;
        if ft.is_symlink() {
            h.update(b"L");
            h.update(rel.as_bytes());
            h.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
        } else if ft.is_dir() {
            hash_dir(root, &path, h)?;
        } else if ft.is_file() {
            let data = std::fs::read(&path)?;
            h.update(b"F");
            h.update((rel.len() as u64).to_le_bytes());
            h.update(rel.as_bytes());
            h.update((data.len() as u64).to_le_bytes());
            h.update(&data);
        }
    }
    Ok(())
}

pub(crate) fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if skipped(&e.file_name()) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        }
    }
    Ok(())
}

/// Whether the project must be installed to be importable by its tests: a `src/` layout with a
/// packaging file, unless the pytest configuration puts a directory on `sys.path` itself
/// (`pythonpath = src`).
pub fn needs_install(root: &Path) -> bool {
    let packaged = ["pyproject.toml", "setup.py", "setup.cfg"].iter().any(|f| root.join(f).is_file());
    let src = root.join("src");
    let src_has_code = std::fs::read_dir(&src).into_iter().flatten().flatten().any(|e| {
        let p = e.path();
        (p.is_dir() && p.join("__init__.py").is_file()) || p.extension().is_some_and(|x| x == "py")
    });
    if !(packaged && src_has_code) {
        return false;
    }
    let sets_pythonpath =
        ["pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg"].iter().any(|f| {
            std::fs::read_to_string(root.join(f))
                .map(|text| text.lines().any(|l| l.trim_start().starts_with("pythonpath") && l.contains('=')))
                .unwrap_or(false)
        });
    !sets_pythonpath
}

/// What the runner needs to know of the interpreter environments are built from, asked of it in
/// one start (each start of a pyenv shim costs tens of milliseconds).
#[derive(Debug, Clone)]
pub struct Interpreter {
    /// Its real executable (`sys.executable`; a shim resolved).
    pub executable: PathBuf,
    /// `sys.version` (part of the base environment's key).
    pub version: String,
    /// The folders it runs from: its installation prefix and its executable's real folder.
    pub dirs: Vec<PathBuf>,
}

impl Interpreter {
    /// Asks the configured interpreter, else `python3` on PATH.
    pub fn probe(configured: Option<&Path>) -> Result<Interpreter, LocalError> {
        const ASK: &str = "import json, os, sys\nprint(json.dumps([sys.executable, sys.version, \
                           sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))]))";
        let candidate = configured.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("python3"));
        let cannot = |e: String| {
            LocalError::Env(format!("cannot run Python interpreter {}: {e}", candidate.display()))
        };
        let text = command_output(Command::new(&candidate).args(["-S", "-c", ASK]))
            .map_err(|e| cannot(e.to_string()))?;
        let [executable, version, prefix, bin]: [String; 4] =
            serde_json::from_str(&text).map_err(|e| cannot(format!("unexpected answer {text:?}: {e}")))?;
        if executable.is_empty() {
            return Err(cannot("it did not report sys.executable".into()));
        }
        Ok(Interpreter { executable: executable.into(), version, dirs: vec![prefix.into(), bin.into()] })
    }
}

/// The interpreter to build environments from: the configured one, else `python3` on PATH
/// resolved to its real executable (pyenv shims are slow to start).
pub fn resolve_python(configured: Option<&Path>) -> Result<PathBuf, LocalError> {
    Interpreter::probe(configured).map(|i| i.executable)
}

/// Checks that `python`, confined as tests are, starts and reaches every path of `paths`.
pub(crate) fn check_usable(python: &Path, confine: &Confinement, paths: &[&Path]) -> Result<(), LocalError> {
    let mut cmd = Command::new(python);
    cmd.args(["-c", "import os, sys\nfor p in sys.argv[1:]: os.stat(p)"]).args(paths).current_dir("/");
    confine.apply(&mut cmd);
    command_output(&mut cmd).map(drop).map_err(|e| {
        let who = confine.ident.map(|i| format!(" as uid {}", i.uid)).unwrap_or_default();
        LocalError::Env(format!(
            "tests cannot run the Python interpreter{who} or reach the runner's folders \
             (runner.local.python, runner.local.venv_dir, the system temp folder): {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn src_layout_needs_install_unless_pytest_sets_pythonpath() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "pyproject.toml", "[project]\nname='x'\n");
        assert!(!needs_install(d.path()));
        write(d.path(), "src/x/__init__.py", "");
        assert!(needs_install(d.path()));
        write(d.path(), "pytest.ini", "[pytest]\npythonpath = src\n");
        assert!(!needs_install(d.path()));
    }

    #[test]
    fn content_hash_ignores_generated_files_and_sees_edits() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "a.py", "x = 1\n");
        write(d.path(), "t/test_a.py", "def test(): pass\n");
        let h1 = content_hash(d.path()).unwrap();
        write(d.path(), "t/__pycache__/test_a.pyc", "junk");
        write(d.path(), ".hypothesis/db", "junk");
        assert_eq!(content_hash(d.path()).unwrap(), h1);
        write(d.path(), "a.py", "x = 2\n");
        assert_ne!(content_hash(d.path()).unwrap(), h1);
    }

    #[test]
    fn atomic_build_keeps_a_finished_env_and_replaces_a_stale_one() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("env");
        std::fs::create_dir_all(target.join("junk")).unwrap();
        build_atomically(&target, |tmp| {
            std::fs::create_dir_all(tmp)?;
            std::fs::write(tmp.join("f"), "1")?;
            Ok(())
        })
        .unwrap();
        assert!(target.join("f").is_file() && target.join(READY_MARKER).is_file());
        build_atomically(&target, |tmp| {
            std::fs::create_dir_all(tmp)?;
            std::fs::write(tmp.join("g"), "2")?;
            Ok(())
        })
        .unwrap();
        assert!(target.join("f").is_file(), "a ready env is never replaced");
    }

    #[test]
    fn urls_and_pip_options_are_refused_before_anything_runs() {
        let d = tempfile::tempdir().unwrap();
        let python = Interpreter {
            executable: PathBuf::from("/nonexistent/python3"),
            version: "3.11.7".into(),
            dirs: Vec::new(),
        };
        let envs = EnvManager::new(&python, d.path().join("envs"), PackageSource::default());
        for bad in ["-r/etc/passwd", "evil @ http://127.0.0.1:1/evil-1.0.tar.gz", "./evil.tar.gz"] {
            let err = envs.project(&["hypothesis".to_string(), bad.to_string()], None).unwrap_err();
            assert!(matches!(err, LocalError::Requirement(_)), "{bad}: {err}");
            assert!(err.to_string().contains("refused"), "{err}");
        }
        assert!(!d.path().join("envs").exists(), "nothing was built");
    }

    #[test]
    fn one_probe_tells_the_executable_version_and_folders() {
        let i = Interpreter::probe(None).expect("python3 on PATH");
        assert!(i.executable.is_absolute() && i.executable.is_file(), "{i:?}");
        assert!(i.version.starts_with("3."), "{i:?}");
        assert_eq!(i.dirs.len(), 2);
        assert!(i.dirs.iter().all(|d| d.is_dir()), "{i:?}");
        assert_eq!(resolve_python(Some(&i.executable)).unwrap(), i.executable);
        let err = Interpreter::probe(Some(Path::new("/nonexistent/python3"))).unwrap_err();
        assert!(err.to_string().contains("cannot run Python interpreter"), "{err}");
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
    }
}
