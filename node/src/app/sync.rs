//! Replication of evaluation records between members over HTTP: pushes of changed records and a
//! periodic digest exchange (anti-entropy) that repairs anything a push missed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::App;
use crate::eval::{EvalId, EvalRecord, ProjectState};

/// Period of the push loop.
const PUSH_EVERY: Duration = Duration::from_millis(250);
/// Period of the digest exchange with one random peer.
const SYNC_EVERY: Duration = Duration::from_secs(2);
/// Timeout of one replication call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A record's fingerprint: differs whenever the content that matters differs.
pub fn fingerprint(rec: &EvalRecord) -> String {
    let settled = rec.projects.iter().filter(|p| !matches!(p.state, ProjectState::Preparing)).count();
    format!(
        "{}:{}:{}:{}:{}:{}:{}",
        rec.term,
        rec.version,
        rec.responsible,
        rec.projects.len(),
        settled,
        rec.results.len(),
        u8::from(rec.end_time.is_some())
    )
}

/// `POST /internal/sync` request: the caller's fingerprints.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyncRequest {
    pub digests: BTreeMap<EvalId, String>,
}

/// `POST /internal/sync` answer: records the caller lacks or holds differently, and ids the
/// answering node wants the caller's copy of.
#[derive(Debug, Serialize, Deserialize)]
pub struct SyncResponse {
    pub records: Vec<EvalRecord>,
    pub want: Vec<EvalId>,
}

pub async fn run(app: Arc<App>) {
    let mut next_sync = Instant::now();
    loop {
        tokio::time::sleep(PUSH_EVERY).await;
        let dirty: Vec<EvalRecord> = {
            let mut st = app.lock();
            let changes = std::mem::take(&mut st.dirty);
            changes.iter().filter_map(|(id, results)| st.evals.get(id).map(|r| r.delta(results))).collect()
        };
        if !dirty.is_empty() {
            push_now(&app, &dirty).await;
        }
        let hinted = app.lock().sync_hints.pop_first();
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

fn peers(app: &App) -> Vec<SocketAddr> {
    app.members().iter().skip(1).filter_map(|m| m.parse().ok()).collect()
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

/// One digest exchange with `peer`.
async fn exchange(app: &Arc<App>, peer: SocketAddr) -> Result<(), String> {
    let http = app.http_of(peer).ok_or_else(|| format!("no HTTP address for {peer}"))?;
    let digests = app.lock().evals.values().map(|r| (r.id, fingerprint(r))).collect();
    let resp: SyncResponse = app
        .client
        .post_json(http, "/internal/sync", &SyncRequest { digests }, CALL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    merge_records(app, resp.records, peer);
    if !resp.want.is_empty() {
        let wanted: Vec<EvalRecord> = {
            let st = app.lock();
            resp.want.iter().filter_map(|id| st.evals.get(id).cloned()).collect()
        };
        let _: Replicated = app
            .client
            .post_json(http, "/internal/replicate", &wanted, CALL_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Answers a digest exchange.
pub fn answer_sync(app: &App, req: &SyncRequest) -> SyncResponse {
    let st = app.lock();
    let records = st
        .evals
        .values()
        .filter(|r| req.digests.get(&r.id).is_none_or(|fp| *fp != fingerprint(r)))
        .cloned()
        .collect();
    let want = req
        .digests
        .iter()
        .filter(|(id, fp)| st.evals.get(id).is_none_or(|r| fingerprint(r) != **fp))
        .map(|(id, _)| *id)
        .collect();
    SyncResponse { records, want }
}

/// Merges received records (whole or deltas) from the member `from`, persisting what changed;
/// prefetches the archives of projects this node lacks. Returns how many records changed.
///
/// A copy is hostile until checked: records with invalid fields are dropped whole
/// ([`EvalRecord::validate`]) and [`EvalRecord::merge`] never replaces or removes what this node
/// accepted. In an insecure network (no secret, so `from` is only matched against the
/// connection's source) a node may only send the records it is responsible for or submitted.
pub fn merge_records(app: &Arc<App>, records: Vec<EvalRecord>, from: SocketAddr) -> usize {
    let from_s = crate::wire::addr_string(from);
    let open = !app.verifier.secret().is_set();
    let mut changed = Vec::new();
    let mut need_blobs = Vec::new();
    {
        let mut st = app.lock();
        for rec in records {
            if let Err(e) = rec.validate() {
                tracing::warn!(eval = rec.id, peer = %from_s, "refusing a replicated record: {e}");
                continue;
            }
            if open && from != app.udp && rec.responsible != from_s && rec.submitted_to != from_s {
                tracing::warn!(eval = rec.id, peer = %from_s, "refusing a record the sender neither owns nor submitted");
                continue;
            }
            let delta = match st.evals.get_mut(&rec.id) {
                Some(mine) => {
                    let merged = mine.merge(&rec);
                    merged.changed().then(|| mine.delta(&merged.results))
                }
                None => {
                    let mut fresh = rec.clone();
                    fresh.results.retain(|t, _| rec.knows_task(t));
                    st.evals.insert(rec.id, fresh.clone());
                    Some(fresh)
                }
            };
            let Some(mine) = st.evals.get(&rec.id) else { continue };
            need_blobs.extend(mine.projects.iter().filter(|p| !app.store.has_blob(&p.content_hash)).cloned());
            if let Some(d) = &delta {
                for p in &d.projects {
                    st.grades.remove(&p.id);
                }
            }
            changed.extend(delta);
        }
    }
    for delta in &changed {
        app.persist(delta);
    }
    for p in need_blobs {
        if !app.lock().fetching.insert(p.content_hash.clone()) {
            continue;
        }
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = app.download_blob(&p, Some(from)).await {
                tracing::debug!(project = %p.id, "prefetching the project archive failed: {e}");
            }
            app.lock().fetching.remove(&p.content_hash);
        });
    }
    if !changed.is_empty() {
        app.wake.notify_one();
    }
    changed.len()
}
