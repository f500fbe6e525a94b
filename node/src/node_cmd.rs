//! `cdtester node`: run the peer protocol (and, once wired, the application on top of it).
//!
//! [`start_protocol`] starts the UDP shell for a configuration; [`run_membership`] is the
//! membership-only node (no HTTP side): it logs membership events, optionally keeps a JSON
//! status file up to date (`--status-file`, used by the real-socket tests) and leaves the
//! network gracefully on Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cdtester_config::Config;

use crate::core::{Event, Snapshot};
use crate::udp::{self, Running, ShellConfig};

/// Start the UDP protocol loop for `config.node` (bind, join, http, secret) and `config.timers`.
pub async fn start_protocol(config: &Config, advertise: Option<SocketAddr>) -> anyhow::Result<Running> {
    let shell = ShellConfig {
        bind: config.node.bind,
        advertise,
        join: config.node.join,
        http: Some(config.node.http),
        timers: config.timers.clone(),
        secret: config.node.secret.clone(),
    };
    udp::start(shell).await.context("starting the peer protocol")
}

/// Run a membership-only node until Ctrl-C or SIGTERM, then leave gracefully.
pub async fn run_membership(config: &Config, status_file: Option<PathBuf>) -> anyhow::Result<()> {
    let Running { mut handle, mut events, task, .. } = start_protocol(config, None).await?;
    let mut status = handle.clone();
    let writer = status_file.map(|path| {
        tokio::spawn(async move {
            loop {
                let snap = status.snapshot();
                if let Err(e) = write_status(&path, &snap) {
                    tracing::warn!(path = %path.display(), "cannot write status file: {e:#}");
                }
                if !status.changed().await {
                    return;
                }
            }
        })
    });
    let logger = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::App { from, msg, .. } => {
                    tracing::debug!(%from, cmd = msg.cmd(), "application message (no application running)")
                }
                Event::CacheUpdate { .. } => {}
                other => tracing::info!(?other, "membership event"),
            }
        }
    });
    shutdown_signal().await;
    tracing::info!("shutting down: leaving the network");
    handle.leave();
    let _ = handle.changed().await;
    task.await.context("protocol loop panicked")?;
    logger.abort();
    if let Some(w) = writer {
        w.abort();
    }
    Ok(())
}

/// Write the snapshot as JSON, atomically (temp file + rename).
pub fn write_status(path: &Path, snap: &Snapshot) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(snap).context("serializing status")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Flags of `cdtester node`; each overrides its config key (`node.bind`, `node.join`, ...).
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// UDP address of the peer protocol (config node.bind, env CDT_NODE__BIND).
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// UDP address of any member to join (config node.join); none starts a new network.
    #[arg(long)]
    pub join: Option<SocketAddr>,
    /// HTTP API address (config node.http).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Directory for durable state (config node.data_dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run an open network without authentication (config node.insecure); see README, Security.
    #[arg(long)]
    pub insecure: bool,
    /// Keep a JSON membership status (id, peers, failed nodes, /network) in this file.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
}

impl NodeArgs {
    /// Apply the flags over the loaded configuration.
    pub fn apply(&self, config: &mut Config) {
        if let Some(b) = self.bind {
            config.node.bind = b;
        }
        if let Some(j) = self.join {
            config.node.join = Some(j);
        }
        if let Some(h) = self.http {
            config.node.http = h;
        }
        if let Some(d) = &self.data_dir {
            config.node.data_dir = d.clone();
        }
        if self.insecure {
            config.node.insecure = true;
        }
    }
}

/// File in the data directory holding the cluster secret a node generated or was given.
pub const SECRET_FILE: &str = "cluster.secret";

/// Closed by default: settles `config.node.secret` before the node starts. A configured secret
/// stands; otherwise the one kept in the data directory; otherwise a node that starts a network
/// generates one, keeps it (mode 0600) and prints the command that joins it, while a node that
/// joins without a secret is refused. `node.insecure` runs an open network instead.
pub fn settle_secret(config: &mut Config) -> anyhow::Result<()> {
    if config.node.insecure {
        anyhow::ensure!(
            config.node.secret.is_none(),
            "--insecure contradicts node.secret: an open network has no secret"
        );
        tracing::warn!(
            "INSECURE NETWORK (node.insecure): nothing is authenticated; anyone who reaches {} can join, \
             forge results and evict members. Use only on a trusted network, e.g. with nodes of the earlier \
             implementation.",
            config.node.bind
        );
        return Ok(());
    }
    if config.node.secret.is_some() {
        return Ok(());
    }
    let path = config.node.data_dir.join(SECRET_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let secret = text.trim();
        anyhow::ensure!(!secret.is_empty(), "the cluster secret file {} is empty", path.display());
        config.node.secret = Some(secret.to_string());
        return Ok(());
    }
    if config.node.join.is_some() {
        anyhow::bail!(
            "joining a network needs its cluster secret: set CDT_NODE__SECRET (or node.secret) to the value \
             the first node printed (it keeps it in <its data dir>/{SECRET_FILE}), or run an open network \
             with --insecure on every node"
        );
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    std::fs::create_dir_all(&config.node.data_dir)
        .with_context(|| format!("creating {}", config.node.data_dir.display()))?;
    write_private(&path, secret.as_bytes())?;
    config.node.secret = Some(secret.clone());
    eprintln!(
        "cdtester: started a new network with a generated cluster secret (kept in {}).\n\
         Join it from another node with:\n  CDT_NODE__SECRET={secret} cdtester node --join {} --bind <IP:PORT> --http <IP:PORT>",
        path.display(),
        config.node.bind
    );
    Ok(())
}

/// Writes a file only its owner can read (created new; never follows an existing file).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

/// Entry point of `cdtester node`.
pub fn main(mut config: Config, args: NodeArgs) -> anyhow::Result<()> {
    args.apply(&mut config);
    settle_secret(&mut config)?;
    if args.status_file.is_none() {
        // The full node: evaluations, HTTP API and storage on top of the protocol.
        return crate::app::node_main(config);
    }
    // With --status-file: the membership layer alone (protocol tests).
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(run_membership(&config, args.status_file))
}
