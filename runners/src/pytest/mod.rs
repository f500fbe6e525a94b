//! The pytest invocation every built-in runner uses, independent of where the process runs
//! (a local subprocess, a forked warm worker or a container): the command line, the reporting
//! plugin (`runners/python/cdtester_report.py`), and the parsing of its records into per-test,
//! per-module results.
//!
//! The plugin classifies each report with `pytest_report_teststatus`, which is exactly what the
//! terminal summary counts, so a module's counts equal plain pytest's for that module.

mod output;
mod records;

use std::io;
use std::path::{Path, PathBuf};

use cdtester_runner_api::Chunk;

pub use output::OutputCap;
pub use records::{Discovery, Record, RunEnd, build_reports, parse_discovery, parse_records};

/// Python module name of the reporting plugin (`-p cdtester_report`).
pub const PLUGIN_MODULE: &str = "cdtester_report";
/// Source of the reporting plugin, to be written where the interpreter finds it.
pub const PLUGIN_SOURCE: &str = include_str!("../../python/cdtester_report.py");
/// Environment variable naming the plugin's record file (`stderr` = the original stderr).
pub const REPORT_ENV: &str = "CDTESTER_REPORT_FILE";
/// Environment variable selecting one chunk of a module (`index/count`).
pub const CHUNK_ENV: &str = "CDTESTER_CHUNK";
/// Prefix of every record line.
pub const MARK: &str = "@@cdtester@@ ";

/// What a pytest process is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Collect only: list items and collection errors (discovery).
    Collect,
    /// Run the given modules (all of the project's tests when none are given).
    Run,
}

/// Writes the plugin into `dir` (created if needed) and returns `dir`, the entry to put on
/// `PYTHONPATH`. Rewrites the file only when its content differs, so concurrent callers are safe.
pub fn install_plugin(dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{PLUGIN_MODULE}.py"));
    if std::fs::read_to_string(&path).ok().as_deref() != Some(PLUGIN_SOURCE) {
        let tmp = dir.join(format!(".{PLUGIN_MODULE}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, PLUGIN_SOURCE)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(dir.to_path_buf())
}

/// Arguments after the interpreter path: `-m pytest -p no:cacheprovider -p cdtester_report ...`.
/// Run mode keeps pytest's default verbosity (it changes what counts, e.g. passing subtests).
pub fn pytest_args(mode: Mode, modules: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["-m", "pytest", "-p", "no:cacheprovider", "-p", PLUGIN_MODULE]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if mode == Mode::Collect {
        args.push("--collect-only".into());
        args.push("-q".into());
    }
    args.extend(modules.iter().cloned());
    args
}

/// Environment variables the plugin reads: where to write records, and which chunk to keep.
pub fn plugin_env(report_target: &str, chunk: Option<Chunk>) -> Vec<(String, String)> {
    let mut env = vec![(REPORT_ENV.to_string(), report_target.to_string())];
    if let Some(c) = chunk {
        env.push((CHUNK_ENV.to_string(), format!("{}/{}", c.index, c.count)));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_args_keep_default_verbosity_and_collect_args_are_quiet() {
        let run = pytest_args(Mode::Run, &["tests/test_a.py".into()]);
        assert_eq!(
            run,
            ["-m", "pytest", "-p", "no:cacheprovider", "-p", "cdtester_report", "tests/test_a.py"]
        );
        let collect = pytest_args(Mode::Collect, &[]);
        assert!(collect.contains(&"--collect-only".to_string()));
        assert!(!run.iter().any(|a| a == "-q" || a == "-v"));
    }

    #[test]
    fn plugin_env_names_the_chunk() {
        let env = plugin_env("/tmp/r.jsonl", Some(Chunk { index: 1, count: 3 }));
        assert_eq!(env[0], (REPORT_ENV.to_string(), "/tmp/r.jsonl".to_string()));
        assert_eq!(env[1], (CHUNK_ENV.to_string(), "1/3".to_string()));
        assert_eq!(plugin_env("stderr", None).len(), 1);
    }

    #[test]
    fn plugin_is_installed_once_and_found() {
        let dir = std::env::temp_dir().join(format!("cdt-plugin-test-{}", std::process::id()));
        let got = install_plugin(&dir).unwrap();
        let text = std::fs::read_to_string(got.join("cdtester_report.py")).unwrap();
        assert_eq!(text, PLUGIN_SOURCE);
        assert!(text.contains(MARK.trim_end()));
        install_plugin(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
