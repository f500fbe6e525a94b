//! `cdtester node`: the node's wiring, the one place that puts its parts together.
//!
//! [`run_node`] runs a full node: store + application + peer protocol + HTTP API, until a
//! shutdown signal. [`start_protocol`] starts the UDP shell for a configuration;
//! [`run_membership`] is the membership-only node (no HTTP side): it logs membership events,
//! optionally keeps a JSON status file up to date (`--status-file`, used by the real-socket
//! tests) and leaves the network gracefully on Ctrl-C / SIGTERM.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use cdtester_config::{Config, NodeConfig};
use cdtester_plugins::PolicySet;

use crate::app::{App, AppOptions, PeerNet, RunnerLookup};
use crate::core::{Event, LocalEvent, Snapshot};
use crate::udp::{self, NodeHandle, Running, ShellConfig};
use crate::wire::Message;

/// Start the UDP protocol loop for `config.node` (bind, advertised addresses, join, secret) and
/// `config.timers`.
pub async fn start_protocol(config: &Config) -> anyhow::Result<Running> {
    let shell = ShellConfig {
        bind: config.node.bind,
        advertise: config.node.advertise,
        join: config.node.join,
        http: Some(config.node.http_advertised()),
        timers: config.timers.clone(),
        secret: config.node.secret.clone(),
    };
    udp::start(shell).await.context("starting the peer protocol")
}

impl PeerNet for NodeHandle {
    fn send(&self, to: SocketAddr, msg: Message) {
        NodeHandle::send(self, to, msg);
    }
    fn broadcast(&self, msg: Message) {
        NodeHandle::broadcast(self, msg);
    }
    fn push_cache(&self) {
        NodeHandle::push_cache(self);
    }
    fn push_state(&self, event: LocalEvent) {
        NodeHandle::push_state(self, event);
    }
    fn snapshot(&self) -> Snapshot {
        NodeHandle::snapshot(self)
    }
    fn peer_http(&self, peer: SocketAddr) -> Option<SocketAddr> {
        NodeHandle::peer_http(self, peer)
    }
}

/// Runs a node with `config` until `shutdown` resolves, then leaves the network gracefully.
pub async fn run_node(
    mut config: Config,
    runners: RunnerLookup,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let policies = PolicySet::load(&config.plugins).context("loading policy plugins")?;
    let listener = crate::http::bind(config.node.http)
        .await
        .with_context(|| format!("binding the HTTP API on {}", config.node.http))?;
    config.node.http = listener.local_addr().context("reading the HTTP address")?;
    settle_addresses(&mut config.node)?;
    let app = App::open(AppOptions {
        udp: config.node.udp_advertised(),
        http: config.node.http_advertised(),
        runners,
        policies,
        config: config.clone(),
        local: false,
    })?;
    let running = start_protocol(&config).await?;
    let handle = running.handle.clone();
    app.start(Arc::new(handle.clone()));
    let mut events = running.events;
    let pump_app = app.clone();
    let pump = tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            pump_app.on_event(ev);
        }
    });
    tracing::info!(udp = %config.node.bind, http = %config.node.http, advertise = %config.node.udp_advertised(),
        http_advertise = %config.node.http_advertised(), data = %config.node.data_dir.display(), "node running");
    crate::http::serve(listener, app.clone(), shutdown).await.context("serving the HTTP API")?;
    tracing::info!("shutting down: leaving the network");
    handle.leave();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), running.task).await;
    pump.abort();
    Ok(())
}

/// The runners a node offers: the built-in ones plus the configured native plugins. The registry
/// lives as long as the node's application; dropping it at shutdown removes the docker runner's
/// containers.
pub fn runners_for(config: &Config) -> RunnerLookup {
    crate::app::registry_lookup(crate::registry::Registry::from_config(config))
}

/// `cdtester node` (full node): runs until Ctrl-C or SIGTERM.
pub fn node_main(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let runners = runners_for(&config);
    runtime.block_on(run_node(config, runners, shutdown_signal()))
}

/// Run a membership-only node until Ctrl-C or SIGTERM, then leave gracefully.
pub async fn run_membership(mut config: Config, status_file: Option<PathBuf>) -> anyhow::Result<()> {
    settle_addresses(&mut config.node)?;
    let Running { mut handle, mut events, task, .. } = start_protocol(&config).await?;
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
    /// UDP address of any member to join, as it advertises itself (config node.join); none
    /// starts a new network.
    #[arg(long)]
    pub join: Option<SocketAddr>,
    /// HTTP API address (config node.http).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// UDP ip:port peers reach this node at, e.g. a forwarded port (config node.advertise, env
    /// CDT_NODE__ADVERTISE); default: --bind, or the outbound interface's IP when --bind is
    /// 0.0.0.0 or [::].
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// HTTP ip:port peers and clients reach the API at (config node.http_advertise, env
    /// CDT_NODE__HTTP_ADVERTISE); default: --http, or the advertised IP when --http is
    /// 0.0.0.0 or [::].
    #[arg(long)]
    pub http_advertise: Option<SocketAddr>,
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
        if let Some(a) = self.advertise {
            config.node.advertise = Some(a);
        }
        if let Some(a) = self.http_advertise {
            config.node.http_advertise = Some(a);
        }
        if let Some(d) = &self.data_dir {
            config.node.data_dir = d.clone();
        }
        if self.insecure {
            config.node.insecure = true;
        }
    }
}

/// Settles `node.advertise` and `node.http_advertise` (call once `node.http` is the bound HTTP
/// address): a configured address stands (port 0 = the bound port); otherwise the bound address,
/// or, when it listens on every interface, the outbound interface's IP (for UDP the one that
/// routes to the join target, else to the internet; for HTTP the advertised UDP IP) with the
/// bound port. Logged when detected.
pub fn settle_addresses(node: &mut NodeConfig) -> anyhow::Result<()> {
    let udp = match node.advertise {
        Some(a) => with_port(a, node.bind.port()),
        None if node.bind.ip().is_unspecified() => {
            let ip = outbound_ip(node.bind, node.join)?;
            tracing::info!(%ip, bind = %node.bind, "node.advertise unset: advertising the outbound interface's address");
            SocketAddr::new(ip, node.bind.port())
        }
        None => node.bind,
    };
    anyhow::ensure!(udp.port() != 0, "node.bind has port 0: give node.advertise a port peers can reach");
    let http = match node.http_advertise {
        Some(a) => with_port(a, node.http.port()),
        None if node.http.ip().is_unspecified() => SocketAddr::new(udp.ip(), node.http.port()),
        None => node.http,
    };
    node.advertise = Some(udp);
    node.http_advertise = Some(http);
    Ok(())
}

fn with_port(addr: SocketAddr, bound: u16) -> SocketAddr {
    if addr.port() == 0 { SocketAddr::new(addr.ip(), bound) } else { addr }
}

/// The IP of the interface this host would use to reach `join` (or, without one, the internet
/// in `bind`'s family). No packet is sent: connecting a UDP socket only chooses a route.
fn outbound_ip(bind: SocketAddr, join: Option<SocketAddr>) -> anyhow::Result<IpAddr> {
    let documentation: IpAddr = if bind.is_ipv4() {
        Ipv4Addr::new(192, 0, 2, 1).into()
    } else {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into()
    };
    let target = join.unwrap_or(SocketAddr::new(documentation, 9));
    let local: SocketAddr =
        if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let probe = || -> std::io::Result<IpAddr> {
        let socket = std::net::UdpSocket::bind(local)?;
        socket.connect(target)?;
        Ok(socket.local_addr()?.ip())
    };
    probe().with_context(|| {
        format!("{bind} listens on every interface and no route to {target} tells which address peers reach; set node.advertise")
    })
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
        config.node.udp_advertised()
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
    settle_addresses(&mut config.node)?;
    settle_secret(&mut config)?;
    if args.status_file.is_none() {
        // The full node: evaluations, HTTP API and storage on top of the protocol.
        return node_main(config);
    }
    // With --status-file: the membership layer alone (protocol tests).
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(run_membership(config, args.status_file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(bind: &str, http: &str) -> NodeConfig {
        NodeConfig {
            bind: bind.parse().expect("bind"),
            http: http.parse().expect("http"),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn configured_advertise_addresses_stand_and_port_0_means_the_bound_port() {
        let mut n = node("0.0.0.0:7000", "[::]:8000");
        n.advertise = Some("203.0.113.5:0".parse().expect("a"));
        n.http_advertise = Some("[2001:db8::5]:18000".parse().expect("a"));
        settle_addresses(&mut n).expect("settles");
        assert_eq!(n.udp_advertised(), "203.0.113.5:7000".parse().expect("a"));
        assert_eq!(n.http_advertised(), "[2001:db8::5]:18000".parse().expect("a"));
        // Settling again (after the HTTP listener is bound) changes nothing.
        let before = n.clone();
        settle_addresses(&mut n).expect("settles");
        assert_eq!(n, before);
    }

    #[test]
    fn bound_addresses_are_advertised_when_specific() {
        let mut n = node("[::1]:7000", "127.0.0.1:8000");
        settle_addresses(&mut n).expect("settles");
        assert_eq!(n.udp_advertised(), "[::1]:7000".parse().expect("a"));
        assert_eq!(n.http_advertised(), "127.0.0.1:8000".parse().expect("a"));
    }

    #[test]
    fn every_interface_advertises_the_one_routing_to_the_join_target() {
        let mut n = node("0.0.0.0:7000", "0.0.0.0:8000");
        n.join = Some("127.0.0.1:7001".parse().expect("a"));
        settle_addresses(&mut n).expect("settles");
        assert_eq!(n.udp_advertised(), "127.0.0.1:7000".parse().expect("a"));
        assert_eq!(n.http_advertised(), "127.0.0.1:8000".parse().expect("a"), "HTTP takes the advertised IP");
        let mut n = node("0.0.0.0:0", "127.0.0.1:8000");
        n.join = Some("127.0.0.1:7001".parse().expect("a"));
        let err = settle_addresses(&mut n).expect_err("port 0 cannot be advertised").to_string();
        assert!(err.contains("node.advertise"), "{err}");
    }
}
