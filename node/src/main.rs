use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Check the configuration and print it as resolved.
    Config,
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
        Command::Config => {
            println!("{config:#?}");
            Ok(())
        }
    }
}
