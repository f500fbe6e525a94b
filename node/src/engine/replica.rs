//! Replicated records: merging peers' copies, the digest exchange, and the summaries the
//! protocol core carries (CACHE_UPDATE content, active evaluations for elections).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Action, Engine};
use crate::eval::{self, EvalRecord, ProjectState};
use crate::ids::{EvalId, TaskId};
use crate::wire::{self, CacheContent, EvalMap};

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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    pub digests: BTreeMap<EvalId, String>,
}

/// `POST /internal/sync` answer: records the caller lacks or holds differently, and ids the
/// answering node wants the caller's copy of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncResponse {
    pub records: Vec<EvalRecord>,
    pub want: Vec<EvalId>,
}

/// How many finished evaluations a CACHE_UPDATE carries besides the unfinished ones.
const CACHE_FINISHED_KEEP: usize = 20;

impl Engine {
    /// Merges received records (whole or deltas) from member `from`, persisting what changed
    /// and asking for the archives of their projects.
    ///
    /// A copy is hostile until checked: records with invalid fields are dropped whole
    /// ([`EvalRecord::validate`]) and [`EvalRecord::merge`] never replaces or removes what this
    /// node accepted. In an open network (no secret, so `from` is only matched against the
    /// connection's source) a node may only send the records it is responsible for or submitted.
    pub(super) fn merge(&mut self, records: Vec<EvalRecord>, from: SocketAddr, out: &mut Vec<Action>) {
        let from_s = from.to_string();
        let mut changed = 0;
        for rec in records {
            if let Err(e) = rec.validate() {
                tracing::warn!(eval = %rec.id, peer = %from_s, "refusing a replicated record: {e}");
                continue;
            }
            if self.cfg.open && from != self.cfg.me && rec.responsible != from && rec.submitted_to != from {
                tracing::warn!(eval = %rec.id, peer = %from_s, "refusing a record the sender neither owns nor submitted");
                continue;
            }
            let id = rec.id;
            let added = match self.evals.get_mut(&id) {
                Some(mine) => {
                    let merged = mine.merge(&rec);
                    merged.changed().then_some(merged.results)
                }
                None => {
                    let mut fresh = rec;
                    let known: Vec<TaskId> =
                        fresh.results.keys().filter(|t| fresh.knows_task(t)).cloned().collect();
                    fresh.results.retain(|t, _| known.contains(t));
                    self.evals.insert(id, fresh);
                    Some(known)
                }
            };
            let Some(added) = added else { continue };
            if self.evals.get(&id).is_some_and(|r| r.responsible != self.me()) {
                self.drop_assignments_of(id);
            }
            let Some(mine) = self.evals.get(&id) else { continue };
            changed += 1;
            out.push(Action::Persist(mine.delta(&added)));
            for p in &mine.projects {
                out.push(Action::Prefetch { project: p.clone(), from });
            }
        }
        out.push(Action::Merged(changed));
    }

    /// Fingerprints of every record (the caller's half of a digest exchange).
    pub fn digests(&self) -> SyncRequest {
        SyncRequest { digests: self.evals.values().map(|r| (r.id, fingerprint(r))).collect() }
    }

    /// Answers a digest exchange.
    pub fn answer_sync(&self, req: &SyncRequest) -> SyncResponse {
        let records = self
            .evals
            .values()
            .filter(|r| req.digests.get(&r.id).is_none_or(|fp| *fp != fingerprint(r)))
            .cloned()
            .collect();
        let want = req
            .digests
            .iter()
            .filter(|(id, fp)| self.evals.get(id).is_none_or(|r| fingerprint(r) != **fp))
            .map(|(id, _)| *id)
            .collect();
        SyncResponse { records, want }
    }

    /// `{eval_id: [project_id...]}` of the unfinished evaluations each node is responsible for.
    pub fn active_evaluations(&self) -> BTreeMap<String, EvalMap> {
        let mut out: BTreeMap<String, EvalMap> = BTreeMap::new();
        for r in self.evals.values().filter(|r| r.end_time.is_none()) {
            out.entry(r.responsible.to_string())
                .or_default()
                .insert(r.id.to_string(), r.projects.iter().map(|p| p.id.to_string()).collect());
        }
        out
    }

    /// The `evaluations`/`projects`/`stats` part of this node's CACHE_UPDATE (the reference's
    /// summary): every unfinished evaluation and the latest finished ones.
    pub fn cache_content(&self) -> CacheContent {
        let me = self.me();
        let mut finished: Vec<&EvalRecord> = self.evals.values().filter(|r| r.end_time.is_some()).collect();
        finished.sort_by(|a, b| b.end_time.unwrap_or(0.0).total_cmp(&a.end_time.unwrap_or(0.0)));
        let chosen = self
            .evals
            .values()
            .filter(|r| r.end_time.is_none())
            .chain(finished.into_iter().take(CACHE_FINISHED_KEEP));
        let mut content = CacheContent::default();
        for rec in chosen {
            content.evaluations.insert(
                rec.id.to_string(),
                wire::EvaluationEntry {
                    projects: rec.projects.iter().map(|p| p.id.to_string()).collect(),
                    start_time: rec.start_time,
                    end_time: rec.end_time,
                },
            );
            for p in &rec.projects {
                let modules = p
                    .modules()
                    .iter()
                    .map(|m| {
                        let progress = rec.module_progress(p, m);
                        let c = progress.counts();
                        let entry = wire::ModuleEntry {
                            passed: c.passes(),
                            failed: c.failures(),
                            time: progress.duration(),
                            status: progress.status(),
                        };
                        (m.to_string(), entry)
                    })
                    .collect();
                let entry = wire::ProjectEntry {
                    project_name: p.name.clone(),
                    node: rec.responsible.to_string(),
                    modules,
                };
                content.projects.insert(p.id.to_string(), entry);
            }
        }
        let s = eval::stats(self.evals.values(), &[me.to_string()]);
        if let Some(row) = s.nodes.into_iter().next() {
            content.stats = wire::NodeStats {
                failed: row.failed,
                passed: row.passed,
                projects: row.projects,
                modules: row.modules,
                evaluations: row.evaluations.iter().map(|e| e.to_string()).collect(),
                submitted_evaluation: self
                    .evals
                    .values()
                    .filter(|r| r.submitted_to == me)
                    .map(|r| r.id.to_string())
                    .collect(),
            };
        }
        content
    }
}
