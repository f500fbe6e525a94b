//! `cdtester image build`: the docker runner's base image, built offline (see
//! `cdtester_runners::docker::image` for the recipe); `--node`: the image that runs a node (see
//! `cdtester::node_image`).

use std::path::PathBuf;

use anyhow::Context;
use cdtester_config::Config;
use cdtester_runners::docker::{self, ImageBuildOptions};

use cdtester::node_image::{NodeImageOptions, build_node_image};

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Build the runner image (debootstrap + pinned pytest wheels, no registry) unless the
    /// current recipe's version is already there; tag it as `runner.docker.image`. With
    /// `--node`, also the node image on top of it (this binary, user `cdtester`, `/data`).
    Build(BuildArgs),
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Debian mirror; default: the machine's apt sources, else deb.debian.org.
    #[arg(long, env = "CDT_IMAGE_MIRROR")]
    mirror: Option<String>,
    /// Host interpreter with pip, used to download the wheels; default: runner.local.python,
    /// else `python3`.
    #[arg(long, env = "CDT_IMAGE_PYTHON")]
    python: Option<PathBuf>,
    /// Scratch directory for the root file system (about 300 MiB); default: the system's
    /// temporary directory.
    #[arg(long, env = "CDT_IMAGE_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Rebuild even if the image is up to date.
    #[arg(long)]
    force: bool,
    /// Build the node image (`cdtester-node`) instead: a container that runs `cdtester node`.
    #[arg(long)]
    node: bool,
    /// Tag of the node image.
    #[arg(long, default_value = "cdtester-node:latest", requires = "node")]
    node_tag: String,
}

pub fn run(cmd: ImageCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(args) => build(args, config),
    }
}

fn build(args: BuildArgs, config: &Config) -> anyhow::Result<()> {
    let options = ImageBuildOptions {
        tag: config.runner.docker.image.clone(),
        mirror: args.mirror,
        python: args
            .python
            .or_else(|| config.runner.local.python.clone())
            .unwrap_or_else(|| PathBuf::from("python3")),
        work_dir: args.work_dir.unwrap_or_else(std::env::temp_dir),
        force: args.force && !args.node,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let started = std::time::Instant::now();
    let (versioned, id, tag, built) = rt.block_on(async {
        let engine = docker::connect(config.runner.docker.socket.as_deref())
            .await
            .context("connecting to the Docker engine")?;
        if !args.node {
            let b = docker::build_image(&engine, &options).await.context("building the runner image")?;
            return anyhow::Ok((b.versioned_tag, b.id, b.tag, b.built));
        }
        let binary = std::env::current_exe().context("locating the cdtester binary")?;
        let node = NodeImageOptions { tag: args.node_tag, runner: options, binary, force: args.force };
        let b = build_node_image(&engine, &node).await.context("building the node image")?;
        anyhow::Ok((b.versioned_tag, b.id, b.tag, b.built))
    })?;
    let verb = if built { "built" } else { "up to date" };
    println!("{versioned} {verb} ({id}), tagged {tag} in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
