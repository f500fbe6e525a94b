//! Running a full node: store + application + peer protocol + HTTP API, until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use cdtester_config::Config;
use cdtester_plugins::PolicySet;

use super::{App, AppOptions, PeerNet, RunnerLookup};
use crate::core::{LocalEvent, Snapshot};
use crate::udp::NodeHandle;
use crate::wire::Message;

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
    crate::node_cmd::settle_addresses(&mut config.node)?;
    let app = App::open(AppOptions {
        udp: config.node.udp_advertised(),
        http: config.node.http_advertised(),
        runners,
        policies,
        config: config.clone(),
        local: false,
    })?;
    let running = crate::node_cmd::start_protocol(&config).await?;
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
    super::registry_lookup(crate::registry::Registry::from_config(config))
}

/// `cdtester node` (full node): runs until Ctrl-C or SIGTERM.
pub fn node_main(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let runners = runners_for(&config);
    runtime.block_on(run_node(config, runners, crate::node_cmd::shutdown_signal()))
}
