//! The pytest validation corpus (`tests/data/corpus.json`, a copy of the shared manifest): real
//! PyPI sdists with their expected per-module results. Used by the end-to-end tests and by
//! `cdtester bench local`. Sources are fetched with `pip download --no-binary :all: --no-deps`,
//! checked against the pinned sha256 and cached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cdtester_runner_api::Counts;
use serde::Deserialize;

/// The manifest built into the binary (`tests/data/corpus.json`), so that benchmarks need no
/// checkout of the repository.
const SHIPPED: &str = include_str!("../../tests/data/corpus.json");

/// The projects of the built-in manifest.
pub fn shipped() -> Result<Vec<CorpusProject>, CorpusError> {
    parse(SHIPPED.as_bytes(), Path::new("<built-in corpus manifest>"))
}

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("reading the corpus manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("downloading {requirement}: {reason}")]
    Download { requirement: String, reason: String },
    #[error("{file}: sha256 {got} does not match the pinned {want}")]
    Checksum { file: String, got: String, want: String },
    #[error("unpacking {file}: {reason}")]
    Unpack { file: String, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sdist {
    pub filename: String,
    pub sha256: String,
}

/// Counts as the manifest writes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct ExpectedCounts {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub error: u64,
    pub xfailed: u64,
    pub xpassed: u64,
}

impl ExpectedCounts {
    /// The same six numbers of a result's counts.
    pub fn of(c: &Counts) -> ExpectedCounts {
        ExpectedCounts {
            passed: c.passed,
            failed: c.failed,
            skipped: c.skipped,
            error: c.error,
            xfailed: c.xfailed,
            xpassed: c.xpassed,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModuleRun {
    pub counts: ExpectedCounts,
    #[serde(default)]
    pub time_median_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SeparateRuns {
    pub per_module: BTreeMap<String, ModuleRun>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Timing {
    pub sequential_median_s: f64,
    pub per_module_sum_median_s: f64,
    pub xdist_n2_median_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CorpusProject {
    pub name: String,
    pub version: String,
    pub sdist: Sdist,
    /// The sdist's top folder: the project root.
    pub project_root: String,
    /// Extra test requirements (pinned).
    #[serde(default)]
    pub test_deps: Vec<String>,
    pub separate_module_runs: SeparateRuns,
    pub timing: Timing,
}

impl CorpusProject {
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }

    /// Expected counts per module when each module runs alone.
    pub fn expected_alone(&self) -> BTreeMap<String, ExpectedCounts> {
        self.separate_module_runs.per_module.iter().map(|(m, r)| (m.clone(), r.counts)).collect()
    }
}

/// Reads a manifest.
pub fn load(path: &Path) -> Result<Vec<CorpusProject>, CorpusError> {
    let text = std::fs::read(path)
        .map_err(|e| CorpusError::Manifest { path: path.into(), reason: e.to_string() })?;
    parse(&text, path)
}

fn parse(text: &[u8], origin: &Path) -> Result<Vec<CorpusProject>, CorpusError> {
    serde_json::from_slice(text)
        .map_err(|e| CorpusError::Manifest { path: origin.into(), reason: e.to_string() })
}

fn sha256_file(path: &Path) -> Result<String, CorpusError> {
    Ok(cdtester_runner_api::sha256_hex(&std::fs::read(path)?))
}

/// The project's sdist in `cache`, downloaded with `python -m pip download` when missing and
/// checked against its pinned sha256 either way.
pub fn fetch(project: &CorpusProject, python: &Path, cache: &Path) -> Result<PathBuf, CorpusError> {
    std::fs::create_dir_all(cache)?;
    let path = cache.join(&project.sdist.filename);
    if path.is_file() && sha256_file(&path)? == project.sdist.sha256 {
        return Ok(path);
    }
    // The manifest is ours, but it is still only a strict requirement, after `--`.
    let requirement = cdtester_runner_api::requirement::parse(&project.requirement())
        .map_err(|e| CorpusError::Download { requirement: project.requirement(), reason: e.to_string() })?;
    let tmp = tempfile::Builder::new().prefix(".download-").tempdir_in(cache)?;
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
        ])
        .arg(tmp.path())
        .arg("--")
        .arg(requirement.to_string())
        .stdin(Stdio::null())
        .output()?;
    let fail = |reason: String| CorpusError::Download { requirement: project.requirement(), reason };
    if !out.status.success() {
        return Err(fail(format!("pip exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr))));
    }
    let got = tmp.path().join(&project.sdist.filename);
    if !got.is_file() {
        return Err(fail(format!("pip did not produce {}", project.sdist.filename)));
    }
    let sha = sha256_file(&got)?;
    if sha != project.sdist.sha256 {
        return Err(CorpusError::Checksum {
            file: project.sdist.filename.clone(),
            got: sha,
            want: project.sdist.sha256.clone(),
        });
    }
    std::fs::rename(&got, &path)?;
    Ok(path)
}

/// Unpacks a fetched sdist into `dir` and returns the project root. `dir` must not be below a
/// folder with a pytest configuration (pytest would take it as the projects' rootdir).
pub fn unpack(project: &CorpusProject, sdist: &Path, dir: &Path) -> Result<PathBuf, CorpusError> {
    std::fs::create_dir_all(dir)?;
    let out = Command::new("tar").arg("xzf").arg(sdist).arg("-C").arg(dir).stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(CorpusError::Unpack {
            file: project.sdist.filename.clone(),
            reason: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let root = dir.join(&project.project_root);
    if !root.is_dir() {
        return Err(CorpusError::Unpack {
            file: project.sdist.filename.clone(),
            reason: format!("no {}", project.project_root),
        });
    }
    Ok(root)
}

/// `[[projects]]` rules giving each project its test requirements (matched by its root folder).
pub fn requirement_rules(projects: &[CorpusProject]) -> Vec<cdtester_config::ProjectRule> {
    projects
        .iter()
        .filter(|p| !p.test_deps.is_empty())
        .map(|p| cdtester_config::ProjectRule {
            pattern: p.project_root.clone(),
            runner: None,
            limits: None,
            policies: Vec::new(),
            requirements: p.test_deps.clone(),
            retries: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy must not drift from the shared manifest it was taken from (`../shared` beside the
    /// repository, where the workplace keeps it; nothing to compare where it is absent).
    #[test]
    fn shipped_manifest_is_the_shared_one() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/corpus.json");
        if let Ok(original) = std::fs::read(&shared) {
            assert!(
                SHIPPED.as_bytes() == original,
                "tests/data/corpus.json differs from {}",
                shared.display()
            );
        }
    }

    #[test]
    fn shipped_manifest_has_the_sixteen_projects_with_expectations() {
        let projects = shipped().unwrap();
        assert_eq!(projects.len(), 16);
        let toml = projects.iter().find(|p| p.name == "toml").unwrap();
        let alone = toml.expected_alone();
        assert_eq!(
            alone["tests/test_api.py"],
            ExpectedCounts { passed: 19, failed: 2, skipped: 2, ..Default::default() }
        );
        assert_eq!(toml.requirement(), "toml==0.10.2");
        let rules = requirement_rules(&projects);
        assert!(
            rules.iter().any(|r| r.pattern == "attrs-26.1.0" && r.requirements == ["hypothesis==6.170.15"])
        );
    }

    #[test]
    fn a_bad_manifest_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.json");
        std::fs::write(&p, "{").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("c.json"));
    }
}
