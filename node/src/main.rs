use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod image_cmd;
mod plugins_cmd;

/// cdtester: evaluate Python projects' pytest suites on a peer-to-peer network of nodes.
#[derive(Parser, Debug)]
#[command(name = "cdtester", version, about)]
struct Cli {
    /// Configuration file (TOML); CDT_* environment variables override it.
    #[arg(long, global = true, env = "CDT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate projects on this machine alone (no network). Exit status: 0 evaluated (even with
    /// failing tests), 1 usage or infrastructure error, 2 a project could not be evaluated.
    Run(cdtester::run_cmd::RunArgs),
    /// Run a node of the peer-to-peer network.
    Node(cdtester::node_cmd::NodeArgs),
    /// Submit projects (folders, a zip, git URLs) to a node for evaluation.
    Submit(cdtester::client::SubmitArgs),
    /// Show an evaluation's progress and results.
    Status(cdtester::client::StatusArgs),
    /// List the network's evaluations.
    List(cdtester::client::ListArgs),
    /// Download an evaluation's grades as CSV (project, grade, counts, status, url).
    Grades(cdtester::course_cmd::GradesArgs),
    /// Follow an evaluation's progress live (server-sent events), then print the graded table.
    Watch(cdtester::course_cmd::WatchArgs),
    /// Run the failed modules (or the modules of given tests) of a finished evaluation again,
    /// as a new evaluation.
    Rerun(cdtester::course_cmd::RerunArgs),
    /// Start a local 3-node network, evaluate the bundled example projects, print the grades.
    Demo(cdtester::demo::DemoArgs),
    /// Check the configuration and print it as resolved.
    Config,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        cmd: cdtester::bench::BenchCommand,
    },
    /// Python environments: fill a wheelhouse for nodes that cannot reach the package index.
    Env {
        #[command(subcommand)]
        cmd: cdtester::env_cmd::EnvCommand,
    },
    /// The docker runner's image.
    Image {
        #[command(subcommand)]
        cmd: image_cmd::ImageCommand,
    },
    /// Configured plugins: list them, or check that each loads and answers.
    Plugins {
        #[command(subcommand)]
        cmd: plugins_cmd::PluginsCommand,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CDT_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = cdtester_config::Config::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Node(args) => cdtester::node_cmd::main(config, args),
        Command::Run(args) => cdtester::run_cmd::main(config, args),
        Command::Submit(args) => cdtester::client::submit(args, config.node.http),
        Command::Status(args) => cdtester::client::status(args, config.node.http),
        Command::List(args) => cdtester::client::list(args, config.node.http),
        Command::Grades(args) => cdtester::course_cmd::grades(args, config.node.http),
        Command::Watch(args) => cdtester::course_cmd::watch(args, config.node.http),
        Command::Rerun(args) => cdtester::course_cmd::rerun(args, config.node.http),
        Command::Demo(args) => cdtester::demo::main(config, args),
        Command::Bench { cmd } => cdtester::bench::run(cmd, &config),
        Command::Config => {
            println!("{config:#?}");
            Ok(())
        }
        Command::Env { cmd } => cdtester::env_cmd::run(cmd, &config),
        Command::Image { cmd } => image_cmd::run(cmd, &config),
        Command::Plugins { cmd } => plugins_cmd::run(cmd, &config),
    }
}
