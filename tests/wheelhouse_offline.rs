//! End-to-end: a host without access to the package index builds its environments from a
//! wheelhouse made by `cdtester env prepare` (issue: hosts without the index).
//!
//! `cdtester env prepare` runs here (the index is reachable); `cdtester run` then runs where pip
//! cannot reach any index: its index is a closed local port and, when this test runs as root, the
//! whole run is inside a fresh network namespace that has only a loopback interface. Environments
//! are built from scratch (a fresh venv folder): the base environment with pytest, a project
//! environment with a rule's extra requirement, and a src-layout project installed by its build
//! backend. Without the wheelhouse the same run fails those projects with an error that says what
//! to do instead of pip's bare name-resolution error.

mod common;

use std::path::Path;
use std::process::Command;

use common::{cdtester, describe, output, write_file};

const RULES: &str = "[[projects]]\npattern = \"*\"\nrequirements = [\"six==1.17.0\"]\n";

/// alice needs `six` (from the rule); bob is a src layout that must be installed (setuptools).
fn write_projects(root: &Path) {
    write_file(
        root,
        "alice/tests/test_six.py",
        "import six\n\ndef test_text():\n    assert six.text_type is str\n\ndef test_py2():\n    assert six.PY2\n",
    );
    write_file(
        root,
        "bob/pyproject.toml",
        "[build-system]\nrequires = [\"setuptools>=61\"]\nbuild-backend = \"setuptools.build_meta\"\n\n\
         [project]\nname = \"bobcalc\"\nversion = \"0.1\"\n",
    );
    write_file(root, "bob/src/bobcalc/__init__.py", "def add(a, b):\n    return a + b\n");
    write_file(
        root,
        "bob/tests/test_add.py",
        "from bobcalc import add\n\ndef test_add():\n    assert add(2, 2) == 4\n",
    );
}

/// A network namespace with nothing but loopback, removed on drop; `None` unless root.
struct Offline(Option<String>);

impl Offline {
    fn new() -> Offline {
        // SAFETY: geteuid(2) has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: running with an unreachable index only (no network namespace)");
            return Offline(None);
        }
        let ns = format!("cdtwh{}", std::process::id());
        let ok = |argv: &[&str]| Command::new("ip").args(argv).status().is_ok_and(|s| s.success());
        if !ok(&["netns", "add", &ns]) || !ok(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]) {
            eprintln!("cannot create a network namespace: running with an unreachable index only");
            return Offline(None);
        }
        Offline(Some(ns))
    }

    /// `cdtester` with `args`, offline: an index that refuses connections, inside the namespace.
    fn cdtester(&self, data: &Path, args: &[&str]) -> Command {
        let inner = cdtester(data);
        let mut cmd = match &self.0 {
            None => Command::new(inner.get_program()),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(inner.get_program());
                c
            }
        };
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.env("PIP_INDEX_URL", "http://127.0.0.1:9/simple/").env("PIP_RETRIES", "0").args(args);
        cmd
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        if let Some(ns) = &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn a_host_without_the_index_builds_environments_from_a_prepared_wheelhouse() {
    let work = tempfile::tempdir().expect("tempdir");
    let (projects, house, config) =
        (work.path().join("class"), work.path().join("wheels"), work.path().join("c.toml"));
    write_projects(&projects);
    std::fs::write(&config, RULES).expect("config");
    let cfg = config.to_str().expect("utf-8 path");

    let python = cdtester_runners::local::resolve_python(None).expect("python3");
    let version = cdtester::env_cmd::interpreter_version(&python).expect("python version");
    let out = output(
        cdtester(&work.path().join("prep"))
            .args(["--config", cfg, "env", "prepare", "--python-version", &version, "--wheelhouse"])
            .arg(&house)
            .arg(&projects),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let wheels: Vec<String> = std::fs::read_dir(&house)
        .expect("wheelhouse")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for name in ["pytest-9.2.0-", "six-1.17.0-", "setuptools-"] {
        assert!(
            wheels.iter().any(|w| w.starts_with(name) && w.ends_with(".whl")),
            "{name} missing: {wheels:?}"
        );
    }
    assert!(wheels.iter().all(|w| w.ends_with(".whl")), "wheels only: {wheels:?}");

    let offline = Offline::new();
    // Without the wheelhouse: the environments cannot be built, and the error says what to do.
    let venvs = work.path().join("venvs-none");
    let out = output(
        offline
            .cdtester(
                &work.path().join("d1"),
                &["--config", cfg, "run", "--json", projects.to_str().expect("utf-8")],
            )
            .env("CDT_RUNNER__LOCAL__VENV_DIR", &venvs),
    );
    let text = describe(&out);
    assert!(!out.status.success() && text.contains("cdtester env prepare"), "{text}");

    // With it: everything is built offline and the counts are pytest's.
    let junit = work.path().join("out.xml");
    let out = output(
        offline
            .cdtester(&work.path().join("d2"), &["--config", cfg, "run", "--junit-xml"])
            .arg(&junit)
            .arg(&projects)
            .env("CDT_RUNNER__LOCAL__VENV_DIR", work.path().join("venvs-house"))
            .env("CDT_RUNNER__WHEELHOUSE", &house),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let xml = std::fs::read_to_string(&junit).expect("junit");
    for suite in [
        "<testsuite name=\"alice\" tests=\"2\" failures=\"1\" errors=\"0\" skipped=\"0\"",
        "<testsuite name=\"bob\" tests=\"1\" failures=\"0\" errors=\"0\" skipped=\"0\"",
    ] {
        assert!(xml.contains(suite), "{suite} not in\n{xml}\n{}", describe(&out));
    }
}
