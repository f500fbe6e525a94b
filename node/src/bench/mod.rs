//! `cdtester bench <name>`: benchmarks that print their measurements.

pub mod cluster;
pub mod cluster_membership;
pub mod docker;
pub mod local;
pub mod plugins;

use cdtester_config::Config;

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
    /// WASM policy plugins: module load time (cold and cached) and per-call latency p50/p99.
    Plugins(plugins::Args),
}

/// Run one benchmark.
pub fn run(cmd: BenchCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Local(args) => local::run(args, config),
        BenchCommand::Cluster(args) => cluster::run(args, config),
        BenchCommand::Membership(args) => cluster_membership::run(&args, &config.timers),
        BenchCommand::Plugins(args) => plugins::run(&args),
        BenchCommand::Docker(args) => docker::run(args, config),
    }
}
