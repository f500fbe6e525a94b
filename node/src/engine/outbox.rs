//! The worker's side of result delivery: finished results wait in an outbox until the node
//! responsible for their evaluation has taken them. Results due for the same node go together
//! in one [`Action::DeliverBatch`] (`POST /internal/results` between cdtester nodes); the
//! receiver checks each one exactly as a single `POST /task` ([`Engine::accept`]) and answers
//! each ([`BatchAnswer`]). Lost, duplicated or reordered batches are harmless: an unanswered
//! result is sent again with a growing pause, and accepting one is idempotent per task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Accepted, Action, Delivery, Engine, Now, Refusal, TaskPost};
use crate::ids::EvalId;

/// Most results in one batch.
pub const MAX_BATCH: usize = 64;
/// First pause before a result is sent again; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(2);
/// How long a worker keeps trying to deliver a result.
const PATIENCE: Duration = Duration::from_secs(900);

/// How the receiver of a batch answered one of its results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    pub task_id: String,
    pub attempt: String,
    /// How it was taken, or why it was refused.
    pub outcome: Result<Accepted, String>,
    /// Deliver it again later (the receiver is not responsible now, or is being taken over).
    pub retry: bool,
}

impl BatchAnswer {
    /// The answer to `post` as [`Engine::accept`] gave it.
    pub fn new(post: &TaskPost, outcome: &Result<Accepted, Refusal>) -> BatchAnswer {
        let retry = matches!(outcome, Err(Refusal::Unavailable(_)));
        let outcome = outcome.clone().map_err(|e| e.to_string());
        BatchAnswer { task_id: post.result.task_id.clone(), attempt: post.attempt.clone(), outcome, retry }
    }
}

/// A finished result not delivered yet.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    post: TaskPost,
    /// The node that handed the task out (`None`: this node).
    from: Option<SocketAddr>,
    next: Instant,
    wait: Duration,
    until: Instant,
}

/// A result's key in the outbox: (evaluation, task id, attempt).
type Key = (Option<EvalId>, String, String);

/// Results waiting for delivery.
pub(super) type Outbox = BTreeMap<Key, Outgoing>;

impl Engine {
    /// Queues a finished result for delivery (sent in this step).
    pub(super) fn queue_delivery(&mut self, now: Now, post: TaskPost, from: Option<SocketAddr>) {
        let key = (post.eval_id, post.result.task_id.clone(), post.attempt.clone());
        let o = Outgoing { post, from, next: now.mono, wait: FIRST_WAIT, until: now.mono + PATIENCE };
        self.outbox.entry(key).or_insert(o);
    }

    /// Results queued and not taken yet.
    pub fn undelivered(&self) -> usize {
        self.outbox.len()
    }

    /// Sends the results that are due, one batch per receiving node; takes those this node is
    /// responsible for now in place.
    pub(super) fn send_outbox(&mut self, now: Now, out: &mut Vec<Action>) {
        let due: Vec<(Key, Delivery, Option<SocketAddr>)> = self
            .outbox
            .iter()
            .filter(|(_, o)| o.next <= now.mono)
            .map(|(k, o)| {
                let target = if now.mono >= o.until { Delivery::Done } else { self.delivery(&o.post) };
                (k.clone(), target, o.from)
            })
            .collect();
        let mut batches: BTreeMap<SocketAddr, Vec<TaskPost>> = BTreeMap::new();
        for (key, target, from) in due {
            let to = match target {
                Delivery::Done => {
                    self.outbox.remove(&key);
                    continue;
                }
                Delivery::Here => {
                    self.deliver_here(now, key, out);
                    continue;
                }
                Delivery::To(a) => Some(a),
                Delivery::Unknown => from,
            };
            let Some(o) = self.outbox.get_mut(&key) else { continue };
            o.next = now.mono + o.wait;
            o.wait = (o.wait * 2).min(MAX_WAIT);
            if let Some(to) = to {
                let batch = batches.entry(to).or_default();
                if batch.len() < MAX_BATCH {
                    batch.push(o.post.clone());
                }
            }
        }
        for (to, posts) in batches {
            out.push(Action::DeliverBatch { to, posts });
        }
    }

    /// A queued result of an evaluation this node is responsible for now: accepted in place
    /// (or kept while the evaluation is being taken over).
    fn deliver_here(&mut self, now: Now, key: Key, out: &mut Vec<Action>) {
        let Some(o) = self.outbox.get_mut(&key) else { return };
        o.next = now.mono + o.wait;
        o.wait = (o.wait * 2).min(MAX_WAIT);
        let post = o.post.clone();
        match self.accept(now, post, self.cfg.me, out) {
            Err(Refusal::Unavailable(_)) => {}
            Err(e) => {
                tracing::warn!("own result refused: {e}");
                self.outbox.remove(&key);
            }
            Ok(_) => {
                self.outbox.remove(&key);
            }
        }
    }

    /// The answers of a batch: results taken or refused for good leave the outbox.
    pub(super) fn delivered(&mut self, answers: Vec<BatchAnswer>) {
        for a in answers {
            if a.retry {
                continue;
            }
            if let Err(e) = &a.outcome {
                tracing::warn!(task = %a.task_id, "result refused: {e}");
            }
            self.outbox.retain(|(_, t, at), _| *t != a.task_id || *at != a.attempt);
        }
    }
}
