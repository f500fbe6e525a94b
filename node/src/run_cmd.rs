//! `cdtester run <dir|zip>`: evaluate projects on this machine alone: the node's engine and
//! shell ([`crate::app`]) with one member in this process and no network (no UDP socket, no HTTP
//! server, no listening port), rendered like `cdtester submit --wait` ([`crate::render`]).
//!
//! Exit status: 0 when every project was evaluated (whatever its tests did), 1 on usage or
//! infrastructure errors (missing path, bad zip, unusable runner), 2 when a project could not be
//! evaluated at all (no tests, its environment could not be built, collection failed).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use cdtester_config::Config;
use cdtester_plugins::PolicySet;

use crate::app::{App, AppOptions, LocalNet, RunnerLookup, registry_lookup};
use crate::eval::{EvalReport, ProjectStatus};
use crate::registry::Registry;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A project folder, or a zip holding one project at its root or one per top-level folder.
    pub path: PathBuf,
    /// Print the report as JSON on stdout (as `cdtester status --json`) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write the results as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit_xml: Option<PathBuf>,
    /// Tasks run at the same time (default: runner.workers).
    #[arg(long)]
    pub workers: Option<usize>,
}

/// One project to evaluate.
#[derive(Debug, Clone)]
pub struct ProjectInput {
    pub name: String,
    pub root: PathBuf,
}

/// The node's application as a network of one in this process, for one or more evaluations of
/// project folders (each evaluation releases what it prepared before it returns).
pub struct LocalSession {
    // Dropped first: stops the application's background tasks, which hold references to it.
    runtime: tokio::runtime::Runtime,
    app: Arc<App>,
    /// The store of a run whose data folder another process holds (removed last).
    _private: Option<tempfile::TempDir>,
}

/// Whether `e` says that another process holds the store.
fn store_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::store::StoreError>(),
            Some(crate::store::StoreError::Db(redb::Error::DatabaseAlreadyOpen))
        )
    })
}

impl LocalSession {
    /// Opens the store in `config`'s data folder (its duration memory; a private temporary
    /// store, without remembered durations, when another process holds it) and starts the
    /// application with `config.runner.workers` slots.
    pub fn open(
        mut config: Config,
        runners: RunnerLookup,
        policies: PolicySet,
    ) -> anyhow::Result<LocalSession> {
        // Names the only member; nothing is bound (and so nothing listens beyond loopback).
        let member = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        config.node.http = member;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the tokio runtime")?;
        let mut opts = AppOptions { udp: member, http: member, runners, policies, config, local: true };
        let (app, private) = match App::open(opts.clone()) {
            Ok(app) => (app, None),
            Err(e) if store_in_use(&e) => {
                tracing::warn!(data = %opts.config.node.data_dir.display(), "another cdtester process uses this data folder: this run remembers no module durations");
                let dir = tempfile::Builder::new()
                    .prefix("cdtester-run-")
                    .tempdir()
                    .context("making a temporary folder")?;
                opts.config.node.data_dir = dir.path().to_path_buf();
                (App::open(opts)?, Some(dir))
            }
            Err(e) => return Err(e),
        };
        {
            let _entered = runtime.enter();
            app.start(Arc::new(LocalNet::new(member)));
        }
        Ok(LocalSession { runtime, app, _private: private })
    }

    /// Evaluates `projects` (all tasks on the shared slots, longest first) and returns the
    /// report with per-test results.
    pub fn evaluate(&self, projects: &[ProjectInput]) -> anyhow::Result<EvalReport> {
        let app = self.app.clone();
        let projects: Vec<(String, PathBuf)> =
            projects.iter().map(|p| (p.name.clone(), p.root.clone())).collect();
        self.runtime.block_on(async move {
            let id = app.submit_local(projects).await;
            let report = match &id {
                Ok(id) => app.finished(*id).await,
                Err(_) => None,
            };
            app.finish_local().await;
            let id = id?;
            report.with_context(|| format!("evaluation {id} is gone"))
        })
    }
}

/// The projects of the input folder (a zip holding one project at its root is named after the
/// zip, not its temporary folder).
fn inputs(input: &InputDir, given: &Path) -> anyhow::Result<Vec<ProjectInput>> {
    Ok(crate::archive::split_projects(input.path())
        .with_context(|| format!("reading {}", input.path().display()))?
        .into_iter()
        .map(|(name, root)| {
            let name = match (input, given.file_stem()) {
                (InputDir::Extracted(_), Some(stem)) if root == input.path() => {
                    stem.to_string_lossy().into_owned()
                }
                _ => name,
            };
            ProjectInput { name, root }
        })
        .collect())
}

/// Entry point of `cdtester run`.
pub fn main(mut config: Config, args: RunArgs) -> anyhow::Result<()> {
    config.node.data_dir = data_dir(&config.node.data_dir, |k| std::env::var_os(k));
    if let Some(workers) = args.workers {
        if workers == 0 {
            bail!("--workers must be at least 1");
        }
        config.runner.workers = workers;
    }
    let input = InputDir::open(&args.path)?;
    let projects = inputs(&input, &args.path)?;
    let registry = Registry::from_config(&config);
    // A runner or plugin that cannot be used is the operator's problem, not the project's: stop
    // before doing anything.
    for p in &projects {
        registry
            .get(&config.project_settings(&p.name, None).runner)
            .with_context(|| format!("project {}", p.name))?;
    }
    let policies = PolicySet::load(&config.plugins).context("loading policy plugins")?;
    let session = LocalSession::open(config, registry_lookup(registry), policies)?;
    let report = session.evaluate(&projects)?;
    drop(session);
    if let Some(path) = &args.junit_xml {
        std::fs::write(path, crate::render::junit_xml(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::render::table(&report));
    }
    if report.projects.values().any(|p| p.status == ProjectStatus::Failed) {
        drop(input); // exit() skips destructors: remove the extracted zip first
        std::process::exit(2);
    }
    Ok(())
}

/// Where `cdtester run` keeps its data (duration memory, environments): the configured
/// `node.data_dir`, or, when it is the default (`cdtester-data`, relative to wherever the command
/// runs), `cdtester` in the user's cache folder (`$XDG_CACHE_HOME`, else `$HOME/.cache`).
fn data_dir(configured: &Path, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    if configured != cdtester_config::NodeConfig::default().data_dir {
        return configured.to_path_buf();
    }
    let cache = env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache")));
    cache.map_or_else(|| configured.to_path_buf(), |c| c.join("cdtester"))
}

/// The folder to evaluate: the given one, or a zip extracted into a temporary folder.
enum InputDir {
    Dir(PathBuf),
    Extracted(tempfile::TempDir),
}

impl InputDir {
    fn open(path: &Path) -> anyhow::Result<InputDir> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: no such file or folder", path.display()))?;
        if meta.is_dir() {
            return Ok(InputDir::Dir(path.to_path_buf()));
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("cdtester-run-")
            .tempdir()
            .context("making a temporary folder")?;
        crate::archive::extract_zip(&bytes, dir.path())
            .with_context(|| format!("{} is not a usable zip", path.display()))?;
        Ok(InputDir::Extracted(dir))
    }

    fn path(&self) -> &Path {
        match self {
            InputDir::Dir(p) => p,
            InputDir::Extracted(d) => d.path(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_data_goes_to_the_user_cache_unless_configured() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/u".into()),
            _ => None,
        };
        let default = cdtester_config::NodeConfig::default().data_dir;
        assert_eq!(data_dir(&default, env), PathBuf::from("/home/u/.cache/cdtester"));
        let xdg = |k: &str| (k == "XDG_CACHE_HOME").then(|| "/c".into());
        assert_eq!(data_dir(&default, xdg), PathBuf::from("/c/cdtester"));
        assert_eq!(data_dir(Path::new("/srv/d"), env), PathBuf::from("/srv/d"));
        assert_eq!(data_dir(&default, |_| None), default);
    }
}
