//! Helpers shared by the end-to-end tests (each test file does `mod common;` and uses a part).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `cdtester` binary under test.
pub fn cdtester_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cdtester"))
}

/// Folder for caches kept between test runs: `$CDT_TEST_CACHE`, else `<target>/tmp/cdt-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CDT_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("cdt-cache"))
}

/// Where corpus sdists are cached: `$CDT_CORPUS_CACHE`, else `<cache_dir>/corpus`.
pub fn corpus_cache() -> PathBuf {
    std::env::var_os("CDT_CORPUS_CACHE").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("corpus"))
}

/// A `cdtester` command isolated from the user's configuration: its data folder is `data_dir`,
/// Python environments are cached in `<cache_dir>/venvs` (shared by all tests), logs are quiet.
pub fn cdtester(data_dir: &Path) -> Command {
    let mut cmd = Command::new(cdtester_bin());
    cmd.env("CDT_NODE__DATA_DIR", data_dir)
        .env("CDT_RUNNER__LOCAL__VENV_DIR", cache_dir().join("venvs"))
        .env("CDT_LOG", "warn")
        .env_remove("CDT_CONFIG")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` and returns its output, with stdout/stderr in the panic message if it cannot start.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Writes `text` to `root/rel`, creating folders.
pub fn write_file(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("file has a parent")).expect("create folder");
    std::fs::write(&path, text).expect("write file");
}

/// stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cdtester run --json` output, parsed (panics with the output when it is not JSON).
pub fn run_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", describe(out)))
}

/// The first project of a report (`cdtester run --json`, `status --json`: projects by name).
pub fn first_project(report: &serde_json::Value) -> &serde_json::Value {
    report["projects"]
        .as_object()
        .and_then(|m| m.values().next())
        .unwrap_or_else(|| panic!("no project in {report:#}"))
}

/// Fetches (sha256-checked, cached) and unpacks the named corpus projects under `into`, one
/// folder per project.
pub fn fetch_corpus(names: &[&str], into: &Path) -> Vec<cdtester::corpus::CorpusProject> {
    let all = cdtester::corpus::shipped().expect("corpus manifest");
    let python = cdtester_runners::local::resolve_python(None).expect("python3");
    names
        .iter()
        .map(|name| {
            let p = all
                .iter()
                .find(|p| p.name == *name)
                .unwrap_or_else(|| panic!("{name} not in the corpus"))
                .clone();
            let sdist =
                cdtester::corpus::fetch(&p, &python, &corpus_cache()).unwrap_or_else(|e| panic!("{e}"));
            cdtester::corpus::unpack(&p, &sdist, into).unwrap_or_else(|e| panic!("{e}"));
            p
        })
        .collect()
}

/// A config file giving each project its test requirements, as an operator would write it.
pub fn write_requirement_config(projects: &[cdtester::corpus::CorpusProject], path: &Path) {
    let mut text = String::new();
    for rule in cdtester::corpus::requirement_rules(projects) {
        let reqs: Vec<String> = rule.requirements.iter().map(|r| format!("{r:?}")).collect();
        text.push_str(&format!(
            "[[projects]]\npattern = {:?}\nrequirements = [{}]\n\n",
            rule.pattern,
            reqs.join(", ")
        ));
    }
    std::fs::write(path, text).expect("write config");
}

/// A `cdtester run --json --junit-xml` of corpus projects: where they are, their config file,
/// the projects, the JUnit file and the run's output.
pub struct CorpusRun {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub projects: Vec<cdtester::corpus::CorpusProject>,
    pub junit: PathBuf,
    pub out: Output,
}

/// Fetches the named corpus projects under `<work>/projects` (one folder each), writes a config
/// file `<work>/cdtester.toml` giving them their test requirements, and runs
/// `cdtester --config <it> run --json --junit-xml <work>/<name>.xml` on the folder with its
/// data in `<work>/<name>-data` (asserting that it succeeds).
pub fn corpus_run(names: &[&str], work: &Path, name: &str) -> CorpusRun {
    let dir = work.join("projects");
    let projects = fetch_corpus(names, &dir);
    let config = work.join("cdtester.toml");
    write_requirement_config(&projects, &config);
    let junit = work.join(format!("{name}.xml"));
    let out = output(
        cdtester(&work.join(format!("{name}-data")))
            .arg("--config")
            .arg(&config)
            .args(["run", "--json", "--junit-xml"])
            .arg(&junit)
            .arg(&dir),
    );
    assert!(out.status.success(), "{}", describe(&out));
    CorpusRun { dir, config, projects, junit, out }
}
