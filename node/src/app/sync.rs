//! Replication of evaluation records between members over HTTP: pushes of changed records and a
//! periodic digest exchange (anti-entropy) that repairs anything a push missed. What merges and
//! how is the engine's ([`crate::engine`]); this is the transport.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::App;
use crate::engine::{Input, SyncResponse};
use crate::eval::EvalRecord;

/// Period of the push loop.
const PUSH_EVERY: Duration = Duration::from_millis(250);
/// Period of the digest exchange with one random peer.
const SYNC_EVERY: Duration = Duration::from_secs(2);
/// Timeout of one replication call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(app: Arc<App>) {
    let mut next_sync = Instant::now();
    loop {
        tokio::time::sleep(PUSH_EVERY).await;
        let dirty = app.apply(Input::Flush).replicate;
        if !dirty.is_empty() {
            push_now(&app, &dirty).await;
        }
        let hinted = app.shell().sync_hints.pop_first().filter(|p| app.speaks_extensions(*p));
        if hinted.is_some() || Instant::now() >= next_sync {
            next_sync = Instant::now() + SYNC_EVERY;
            let peer = hinted.or_else(|| random_peer(&app));
            if let Some(peer) = peer
                && let Err(e) = exchange(&app, peer).await
            {
                tracing::debug!(%peer, "anti-entropy exchange failed: {e}");
            }
        }
    }
}

/// Live peers that speak cdtester's extensions (never reference nodes, which have no
/// `/internal/*` routes).
fn peers(app: &App) -> Vec<SocketAddr> {
    app.members()
        .iter()
        .skip(1)
        .filter_map(|m| m.parse().ok())
        .filter(|p| app.speaks_extensions(*p))
        .collect()
}

fn random_peer(app: &App) -> Option<SocketAddr> {
    let p = peers(app);
    if p.is_empty() {
        return None;
    }
    Some(p[rand::random_range(0..p.len())])
}

/// Answer of `POST /internal/replicate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Replicated {
    /// How many of the records changed the receiver's copy.
    pub merged: usize,
}

/// Pushes records (or deltas) to every member whose HTTP address is known, concurrently.
pub async fn push_now(app: &Arc<App>, records: &[EvalRecord]) {
    let targets: Vec<SocketAddr> = peers(app).into_iter().filter_map(|p| app.http_of(p)).collect();
    let calls = targets.into_iter().map(|http| {
        let app = app.clone();
        async move {
            let r: Result<Replicated, _> =
                app.client.post_json(http, "/internal/replicate", &records, CALL_TIMEOUT).await;
            if let Err(e) = r {
                tracing::debug!(%http, "replication push failed: {e}");
            }
        }
    });
    futures_util::future::join_all(calls).await;
}

/// Sends a proposal to member `to` (`POST /internal/propose`) and feeds its vote back; a lost
/// one is sent again by the engine.
pub async fn propose(app: Arc<App>, to: SocketAddr, copy: EvalRecord) {
    let Some(http) = app.http_of(to) else { return };
    match app.client.post_json::<_, crate::engine::Vote>(http, "/internal/propose", &copy, CALL_TIMEOUT).await
    {
        Ok(vote) => {
            app.apply(Input::Voted { vote, from: to });
        }
        Err(e) => tracing::debug!(%to, "proposal failed: {e}"),
    }
}

/// One digest exchange with `peer`.
async fn exchange(app: &Arc<App>, peer: SocketAddr) -> Result<(), String> {
    let http = app.http_of(peer).ok_or_else(|| format!("no HTTP address for {peer}"))?;
    let digests = app.engine().digests();
    let resp: SyncResponse = app
        .client
        .post_json(http, "/internal/sync", &digests, CALL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    super::replicate(app, resp.records, peer);
    if !resp.want.is_empty() {
        let wanted: Vec<EvalRecord> = {
            let engine = app.engine();
            resp.want.iter().filter_map(|id| engine.record(*id).cloned()).collect()
        };
        let _: Replicated = app
            .client
            .post_json(http, "/internal/replicate", &wanted, CALL_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
