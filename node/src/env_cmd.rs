//! `cdtester env prepare`: fills a wheelhouse (`runner.wheelhouse`) where the package index is
//! reachable, so nodes that cannot reach it build their environments from it.
//!
//! What goes in: the pinned pytest and its dependencies, every project rule's `requirements`, and
//! for each given project that must be installed to be tested (a src layout) its
//! `[build-system].requires` (setuptools' defaults when it declares none). Wheels only
//! (`--only-binary=:all:`), for each interpreter version asked (default: the local runner's
//! interpreter and the docker runner's image): pip never builds an sdist here, so no code from a
//! package or a project runs; requirements are strict PEP 508 (no URL, path or pip option).

use std::path::{Path, PathBuf};

use anyhow::Context;
use cdtester_config::Config;
use cdtester_runner_api::requirement::{self, Requirement};
use cdtester_runners::docker::env::{build_requires, download_args};
use cdtester_runners::docker::image::PYTHON_VERSION as IMAGE_PYTHON;
use cdtester_runners::local::{PYTEST_REQUIREMENT, needs_install, resolve_python};
use cdtester_runners::wheelhouse::PackageSource;

#[derive(clap::Subcommand, Debug)]
pub enum EnvCommand {
    /// Download the wheels environments need into a wheelhouse (run where the package index is
    /// reachable; then set runner.wheelhouse to that folder on nodes that cannot reach it).
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
pub struct PrepareArgs {
    /// The wheelhouse folder (created if missing); default: runner.wheelhouse.
    #[arg(long)]
    wheelhouse: Option<PathBuf>,
    /// CPython versions (`3.11`) to fetch wheels for; default: the local runner's interpreter and
    /// the docker runner's image.
    #[arg(long = "python-version", value_name = "X.Y")]
    python_versions: Vec<String>,
    /// Projects (folders) whose build requirements to add, or folders holding one project per
    /// subfolder.
    projects: Vec<PathBuf>,
}

pub fn run(cmd: EnvCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        EnvCommand::Prepare(args) => prepare(args, config),
    }
}

fn prepare(args: PrepareArgs, config: &Config) -> anyhow::Result<()> {
    let dest = args
        .wheelhouse
        .or_else(|| config.runner.wheelhouse.clone())
        .context("no wheelhouse: pass --wheelhouse DIR or set runner.wheelhouse")?;
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    let python = resolve_python(config.runner.local.python.as_deref()).context("finding python3")?;
    let reqs = wanted(config, &args.projects)?;
    let versions = match args.python_versions {
        v if !v.is_empty() => v,
        _ => {
            let local = interpreter_version(&python)?;
            if local == IMAGE_PYTHON { vec![local] } else { vec![local, IMAGE_PYTHON.to_string()] }
        }
    };
    for version in &versions {
        if !version.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
            anyhow::bail!("--python-version {version:?}: expected a version such as 3.11");
        }
        let out = std::process::Command::new(&python)
            .args(download_args(version, &PackageSource::default(), &dest, &reqs))
            .stdin(std::process::Stdio::null())
            .output()
            .context("starting pip download")?;
        if !out.status.success() {
            anyhow::bail!(
                "pip download for CPython {version} failed (wheels only: a requirement without a \
                 wheel cannot go in a wheelhouse):\n{}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let (count, bytes) = wheels_in(&dest)?;
    let names: Vec<String> = reqs.iter().map(Requirement::to_string).collect();
    println!(
        "{}: {count} wheels ({:.1} MiB) for CPython {} covering {}",
        dest.display(),
        bytes as f64 / 1048576.0,
        versions.join(", "),
        names.join(" ")
    );
    Ok(())
}

/// pytest, every project rule's requirements, and the build requirements of the given projects
/// that must be installed to be tested; strict PEP 508, sorted, without repeats.
fn wanted(config: &Config, projects: &[PathBuf]) -> anyhow::Result<Vec<Requirement>> {
    let mut texts = vec![PYTEST_REQUIREMENT.to_string()];
    for rule in &config.projects {
        texts.extend(rule.requirements.iter().cloned());
    }
    for path in projects {
        anyhow::ensure!(path.is_dir(), "{} is not a folder", path.display());
        for root in project_roots(path)? {
            if needs_install(&root) {
                texts.extend(build_requires(&root));
            }
        }
    }
    let mut reqs = requirement::parse_all(&texts)?;
    reqs.sort_by_cached_key(Requirement::to_string);
    reqs.dedup();
    Ok(reqs)
}

/// `path` and its subfolders (a folder of projects or one project: either may need installing).
fn project_roots(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut roots = vec![path.to_path_buf()];
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            roots.push(entry.path());
        }
    }
    Ok(roots)
}

/// `X.Y` of `python`.
pub fn interpreter_version(python: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .context("asking the interpreter its version")?;
    anyhow::ensure!(out.status.success(), "{} did not report its version", python.display());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Wheels in `dir` and their total size.
fn wheels_in(dir: &Path) -> anyhow::Result<(usize, u64)> {
    let mut count = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|x| x == "whl") {
            count += 1;
            bytes += entry.metadata()?.len();
        }
    }
    Ok((count, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_has_pytest_rule_requirements_and_build_requirements_of_src_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("alice");
        std::fs::create_dir_all(src.join("src/pkg")).unwrap();
        std::fs::write(src.join("src/pkg/__init__.py"), "").unwrap();
        std::fs::write(src.join("pyproject.toml"), "[build-system]\nrequires = [\"flit_core>=3.11,<4\"]\n")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("bob/tests")).unwrap();
        let mut config = Config::default();
        let rule = serde_json::json!({"pattern": "*", "requirements": ["six==1.17.0", "six==1.17.0"]});
        config.projects.push(serde_json::from_value(rule).unwrap());
        let names: Vec<String> =
            wanted(&config, &[dir.path().to_path_buf()]).unwrap().iter().map(|r| r.to_string()).collect();
        assert_eq!(names, ["flit_core>=3.11,<4", PYTEST_REQUIREMENT, "six==1.17.0", "wheel"]);
        config.projects[0].requirements = vec!["evil @ http://127.0.0.1:1/e.tar.gz".into()];
        assert!(wanted(&config, &[]).is_err(), "URLs never reach pip");
    }
}
