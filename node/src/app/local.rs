//! The shell seam of `cdtester run`: the node's application with one member, in this process,
//! and no network (no UDP socket, no HTTP server, no listening port). The engine, discovery,
//! preparation, the runners, chunk merging and the duration store are the node's own; only the
//! peer transport is absent, and project folders of this machine are used in place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::{App, AppError, PeerNet, lifecycle};
use crate::core::{LocalEvent, Snapshot};
use crate::eval::EvalReport;
use crate::ids::EvalId;
use crate::wire::Message;

/// The peer protocol of a network of one: nobody to send to, no membership changes.
pub struct LocalNet {
    snapshot: Snapshot,
}

impl LocalNet {
    /// The network of the single member `addr` (never bound: it only names the member).
    pub fn new(addr: SocketAddr) -> LocalNet {
        LocalNet { snapshot: Snapshot { addr: addr.to_string(), ..Snapshot::default() } }
    }
}

impl PeerNet for LocalNet {
    fn send(&self, to: SocketAddr, msg: Message) {
        tracing::debug!(%to, cmd = msg.cmd(), "no network: message dropped");
    }
    fn broadcast(&self, msg: Message) {
        tracing::debug!(cmd = msg.cmd(), "no network: broadcast dropped");
    }
    fn push_cache(&self) {}
    fn push_state(&self, _event: LocalEvent) {}
    fn snapshot(&self) -> Snapshot {
        self.snapshot.clone()
    }
}

impl App {
    /// Submits project folders of this machine (the operator's own, named by the operator) as
    /// one evaluation; they are prepared and run where they are, without an archive.
    pub async fn submit_local(
        self: &Arc<Self>,
        projects: Vec<(String, PathBuf)>,
    ) -> Result<EvalId, AppError> {
        if projects.is_empty() {
            return Err(AppError::BadRequest("no project to evaluate".into()));
        }
        let hashed = tokio::task::spawn_blocking(move || {
            projects
                .into_iter()
                .map(|(name, root)| {
                    let hash = cdtester_runners::local::content_hash(&root)
                        .map_err(|e| format!("reading {}: {e}", root.display()))?;
                    Ok((name, root, hash))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(AppError::BadRequest)?;
        {
            let mut shell = self.shell();
            for (_, root, hash) in &hashed {
                shell.local_roots.insert(hash.clone(), root.clone());
            }
        }
        let projects = hashed.into_iter().map(|(name, _, hash)| (name, None, hash)).collect();
        Ok(self.register(projects, Vec::new(), None).await)
    }

    /// Waits for evaluation `id` to finish (woken by its record's changes, no polling) and
    /// returns its report with per-test results; `None` for an unknown evaluation.
    pub async fn finished(self: &Arc<Self>, id: EvalId) -> Option<EvalReport> {
        let mut changes = self.changes.subscribe();
        loop {
            match self.engine().record(id) {
                None => return None,
                Some(r) if r.end_time.is_some() => break,
                Some(_) => {}
            }
            changes.changed().await.ok()?;
        }
        self.report(id, true)
    }

    /// Ends a local evaluation's use of this machine: releases every prepared project (which
    /// stops the warm interpreters and saves the runners' memories) and writes the module
    /// durations remembered since the last call, in one transaction.
    pub async fn finish_local(self: &Arc<Self>) {
        lifecycle::release_all(self).await;
        let durations = std::mem::take(&mut self.shell().durations);
        if let Err(e) = self.store.record_durations(&durations) {
            tracing::warn!("remembering the module durations: {e}");
        }
        self.shell().local_roots.clear();
    }
}
