//! `cdtester bench <name>`: benchmarks that print their measurements.

pub mod cluster;
pub mod cluster_membership;
pub mod course;
pub mod docker;
pub mod latency;
pub mod local;
pub mod memory;
pub mod plugins;
pub mod scale;
pub mod udp_auth;

use std::path::PathBuf;

use anyhow::bail;
use cdtester_config::Config;

use crate::corpus::{self, CorpusProject};

/// The `p` quantile (0..=1) of `sorted` by nearest rank; `sorted` must not be empty.
pub(crate) fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Which corpus projects a benchmark measures, and where their sdists are cached.
#[derive(Debug, Clone, clap::Args)]
pub struct CorpusArgs {
    /// Corpus manifest (default: the one built into the binary, `tests/data/corpus.json`).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Where sdists are cached (default: $CDT_CORPUS_CACHE, else <data_dir>/corpus-cache).
    #[arg(long, env = "CDT_CORPUS_CACHE")]
    pub cache: Option<PathBuf>,
    /// Only these projects (comma-separated names); default: the benchmark's own set.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

impl CorpusArgs {
    /// The manifest's projects named by `--only`, else those in `default` (all when `None`).
    pub fn projects(&self, default: Option<&[&str]>) -> anyhow::Result<Vec<CorpusProject>> {
        let mut projects = match &self.corpus {
            Some(path) => corpus::load(path)?,
            None => corpus::shipped()?,
        };
        let wanted: Vec<String> = match (self.only.is_empty(), default) {
            (false, _) => self.only.clone(),
            (true, Some(names)) => names.iter().map(|s| s.to_string()).collect(),
            (true, None) => return Ok(projects),
        };
        projects.retain(|p| wanted.contains(&p.name));
        if projects.is_empty() {
            bail!("no corpus project matches {wanted:?}");
        }
        Ok(projects)
    }

    /// The sdist cache: `--cache`, else `<data_dir>/corpus-cache`.
    pub fn cache_dir(&self, config: &Config) -> PathBuf {
        self.cache.clone().unwrap_or_else(|| config.node.data_dir.join("corpus-cache"))
    }
}

/// Which benchmark to run.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// The corpus under sequential pytest, `pytest -n 2` and cdtester's local runner with 2
    /// workers: per-project and total times and ratios.
    Local(local::Args),
    /// The corpus on networks of 1, 2 and 3 node processes vs sequential pytest and
    /// `pytest -n 2`: wall time, ratios, time to the first result.
    Cluster(cluster::Args),
    /// Membership protocol: failure detection time and messages/s per node for 3, 10 and 50
    /// nodes (deterministic simulation of the protocol core; `--real`: UDP sockets on loopback).
    Membership(cluster_membership::Args),
    /// Docker runner vs local runner on corpus projects: per-module overhead and the ratio.
    Docker(docker::Args),
    /// One assignment's generated student projects under sequential pytest, the `xargs -P`
    /// shell loop, `pytest -n` per project and `cdtester run` (first and warm): times, ratios,
    /// counts, and the peak memory of a large run with each warm zygote's.
    Course(course::Args),
    /// Memory and processes of a node before, during and after many small evaluations.
    Memory(memory::Args),
    /// A warm node's latency: submission to first test start and to finished, p50/p95/max.
    Latency(latency::Args),
    /// WASM policy plugins: module load time (cold and cached) and per-call latency p50/p99.
    Plugins(plugins::Args),
    /// Datagram authentication: datagrams/s encoded and decoded with and without the cluster
    /// MAC and replay check, and the ratio.
    Auth(udp_auth::Args),
    /// Scaling: a generated course on 1, 2, 4 and 8 nodes, each confined to 0.25 CPU (cgroups):
    /// wall time, speedup and efficiency against 1 node.
    Scale(scale::Args),
}

/// Run one benchmark.
pub fn run(cmd: BenchCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Local(args) => local::run(args, config),
        BenchCommand::Cluster(args) => cluster::run(args, config),
        BenchCommand::Membership(args) => cluster_membership::run(&args, &config.timers),
        BenchCommand::Plugins(args) => plugins::run(&args),
        BenchCommand::Docker(args) => docker::run(args, config),
        BenchCommand::Memory(args) => memory::run(args, config),
        BenchCommand::Latency(args) => latency::run(args, config),
        BenchCommand::Course(args) => course::run(args, config),
        BenchCommand::Auth(args) => udp_auth::run(&args),
        BenchCommand::Scale(args) => scale::run(args, config),
    }
}
