//! Fencing of responsibility: a result counts once a majority of the members holds it, and a
//! node that takes over (or resumes) an evaluation first collects every live member's copy.
//!
//! The record's `term` names the responsibility epoch. The responsible node accepts a result
//! provisionally and *proposes* it to the live members (a record delta at its term). A member
//! takes the proposal only while its own copy names the proposer responsible at that term (a
//! member that has seen a higher term refuses, and its answer tells the stale owner); its answer
//! (*vote*) is its copy of the proposed tasks. The result is stored (accepted) when the proposer
//! and a majority of the members it knows ([`Engine::majority`]) hold it. A node without a
//! majority of live members ([`Engine::quorum`]) neither schedules, commits nor takes over, so
//! the side of a partition without a majority accepts nothing, and a result accepted on the other
//! side survives the death of any minority.
//!
//! A takeover raises the term and holds the evaluation until every live member has answered a
//! header-only proposal with its whole copy (phase one): a result a previous owner committed, or
//! proposed to a member, is learnt then and its task is not run again. A node that restarts does
//! the same at its own term after its hold. Votes and proposals are idempotent; lost ones are
//! sent again every `announce_every`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Action, Engine, Now};
use crate::eval::{EvalRecord, ModuleResult};
use crate::ids::{EvalId, TaskId};

/// A provisional result a member took from a proposal, with the proposal's term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub term: u64,
    pub result: ModuleResult,
}

/// A member's answer to a proposal (`POST /internal/propose`): its copy of the record (the
/// proposed tasks' results, or whole for a header-only proposal) and the provisional results it
/// holds for tasks without a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    pub record: EvalRecord,
    #[serde(default)]
    pub proposals: BTreeMap<TaskId, Held>,
}

/// A result accepted provisionally, waiting for a majority.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    result: ModuleResult,
    term: u64,
    acks: BTreeSet<SocketAddr>,
}

/// The first phase of a takeover: it ends when every live member answered and the answers
/// make a majority with this node.
#[derive(Debug, Default)]
pub(super) struct Phase1 {
    waiting: BTreeSet<SocketAddr>,
    answered: BTreeSet<SocketAddr>,
    /// The provisional result of the highest term the answers hold, per task.
    seen: BTreeMap<TaskId, Held>,
}

impl Phase1 {
    /// Keeps a provisional result an answer holds, when its term is the highest seen.
    fn learn(&mut self, task: TaskId, held: Held) {
        if self.seen.get(&task).is_none_or(|s| s.term < held.term) {
            self.seen.insert(task, held);
        }
    }
}

/// The fencing state of one node.
#[derive(Debug, Default)]
pub(super) struct Fence {
    /// Members counted for the majority: live peers (`None`) and failed ones (down since).
    known: BTreeMap<SocketAddr, Option<Instant>>,
    /// The members of `known` last handed out to be kept ([`Action::RememberMembers`]).
    remembered: BTreeSet<SocketAddr>,
    /// The peers that take part in majorities (cdtester nodes, not reference-implementation
    /// ones); `None`: every peer.
    voters: Option<BTreeSet<SocketAddr>>,
    /// Provisional results per evaluation, by task.
    pending: BTreeMap<EvalId, BTreeMap<TaskId, Pending>>,
    /// Provisional results this node took from other members' proposals.
    held: BTreeMap<EvalId, BTreeMap<TaskId, Held>>,
    /// Evaluations taken over or resumed, in their first phase.
    phase1: BTreeMap<EvalId, Phase1>,
    /// Failed nodes whose evaluations wait for this node to see a majority again.
    deferred: BTreeSet<SocketAddr>,
    /// Evaluations whose proposals go out at the end of this step.
    propose: BTreeSet<EvalId>,
    next_resend: Option<Instant>,
}

impl Fence {
    /// The fence of a node that starts with the `members` it counted before: failed members
    /// (down since `now`) until it sees them live.
    pub(super) fn restored(members: impl IntoIterator<Item = SocketAddr>, now: Instant) -> Fence {
        let known: BTreeMap<SocketAddr, Option<Instant>> =
            members.into_iter().map(|m| (m, Some(now))).collect();
        let remembered = known.keys().copied().collect();
        Fence { known, remembered, ..Fence::default() }
    }

    /// Hands out the members counted now when they changed since last handed out.
    pub(super) fn remember_members(&mut self, out: &mut Vec<Action>) {
        if !self.known.keys().eq(self.remembered.iter()) {
            self.remembered = self.known.keys().copied().collect();
            out.push(Action::RememberMembers(self.remembered.iter().copied().collect()));
        }
    }

    /// The live peers now; failed ones stay counted for `hold` (a node cut off alone must not
    /// soon count itself a majority).
    pub(super) fn members(&mut self, now: Instant, peers: &BTreeSet<SocketAddr>, hold: Duration) {
        for p in peers {
            self.known.insert(*p, None);
        }
        for (a, down) in &mut self.known {
            if down.is_none() && !peers.contains(a) {
                *down = Some(now);
            }
        }
        self.known.retain(|_, down| down.is_none_or(|t| now.saturating_duration_since(t) < hold));
        for p in self.phase1.values_mut() {
            p.waiting = peers.difference(&p.answered).copied().collect();
        }
    }

    /// A peer left gracefully: it no longer counts.
    pub(super) fn left(&mut self, addr: SocketAddr) {
        self.known.remove(&addr);
    }

    pub(super) fn in_phase1(&self, eval: EvalId) -> bool {
        self.phase1.contains_key(&eval)
    }

    pub(super) fn is_pending(&self, eval: EvalId, task: &TaskId) -> bool {
        self.pending.get(&eval).is_some_and(|p| p.contains_key(task))
    }

    /// Forgets what this node proposed or awaited for an evaluation it no longer owns.
    pub(super) fn forget(&mut self, eval: EvalId) {
        self.pending.remove(&eval);
        self.phase1.remove(&eval);
    }
}

/// Terms of one takeover step: a takeover moves to the next multiple of this plus a number
/// derived from the node's address, so that two nodes taking over the same evaluation at once
/// (views that differ for a moment) still get different, ordered terms.
const TERM_STEP: u64 = 1 << 16;

/// The term a takeover by `me` moves a record at term `t` to: larger than `t`, and unique to
/// `me` among nodes whose addresses hash differently (FNV-1a, stable across builds).
pub(super) fn next_term(t: u64, me: &str) -> u64 {
    let hash =
        me.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (t / TERM_STEP + 1).saturating_mul(TERM_STEP).saturating_add(hash % TERM_STEP)
}

/// Whether two results are the same execution's (its attempt id and worker; a copy that went
/// through JSON may differ in the last bit of a float).
fn same_result(a: &ModuleResult, b: &ModuleResult) -> bool {
    a.attempt == b.attempt && a.node == b.node
}

impl Engine {
    /// The live peers that vote.
    pub(super) fn live_voters(&self) -> BTreeSet<SocketAddr> {
        match &self.fence.voters {
            Some(v) => self.peers.intersection(v).copied().collect(),
            None => self.peers.clone(),
        }
    }

    /// The membership changed: live voters and failed ones.
    pub(super) fn fence_members(&mut self, now: Instant, voters: Option<Vec<SocketAddr>>) {
        if let Some(v) = voters {
            self.fence.voters = Some(v.into_iter().collect());
        }
        let live = self.live_voters();
        self.fence.members(now, &live, self.cfg.quorum_hold);
    }

    /// Members this node counts (itself included) and how many of them make a majority.
    pub(super) fn majority(&self) -> usize {
        let members = 1 + self.fence.known.len();
        members / 2 + 1
    }

    /// Whether this node sees a majority of the members it knows live (itself included).
    pub(super) fn quorum(&self) -> bool {
        1 + self.live_voters().len() >= self.majority()
    }

    /// Proposes a result this node accepted for a task of `eval` (or stores it at once when this
    /// node alone is a majority). Returns false when the task has a proposal already.
    pub(super) fn propose_result(
        &mut self,
        now: Now,
        eval: EvalId,
        result: (&TaskId, ModuleResult),
        out: &mut Vec<Action>,
    ) -> bool {
        let (task, result) = result;
        if self.fence.is_pending(eval, task) {
            return false;
        }
        #[cfg(test)]
        if self.bug == Some(super::Bug::AcceptSecondResult) {
            return self.store_result(now, eval, task, result, out);
        }
        if self.majority() <= 1 {
            return self.store_result(now, eval, task, result, out);
        }
        let Some(term) = self.evals.get(&eval).map(|r| r.term) else { return false };
        let p = Pending { result, term, acks: BTreeSet::new() };
        self.fence.pending.entry(eval).or_default().insert(task.clone(), p);
        self.fence.propose.insert(eval);
        true
    }

    /// Starts phase one for an evaluation this node took over or resumed.
    pub(super) fn start_phase1(&mut self, eval: EvalId) {
        self.fence.pending.remove(&eval);
        if self.majority() > 1 {
            let p = Phase1 { waiting: self.live_voters(), ..Phase1::default() };
            self.fence.phase1.insert(eval, p);
            self.fence.propose.insert(eval);
        }
    }

    /// Ends the first phases whose answers are in, recording the tasks that killed their
    /// workers too often as crashed.
    pub(super) fn end_phase1(&mut self, now: Now, out: &mut Vec<Action>) {
        let majority = self.majority();
        let done: Vec<EvalId> = self
            .fence
            .phase1
            .iter()
            .filter(|(_, p)| p.waiting.is_empty() && p.answered.len() + 1 >= majority)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            let Some(mut p) = self.fence.phase1.remove(&id) else { continue };
            // This node is one of the members too: a proposal of the previous owner it holds
            // may be one a majority held (and the owner stored), with other holders gone.
            for (t, h) in self.fence.held.get(&id).into_iter().flatten() {
                p.learn(t.clone(), h.clone());
            }
            for (t, h) in p.seen {
                if self.evals.get(&id).is_some_and(|r| !r.results.contains_key(&t)) {
                    self.propose_result(now, id, (&t, h.result), out);
                }
            }
            let Some(rec) = self.evals.get(&id) else { continue };
            let crashed: Vec<(TaskId, u32)> = rec
                .worker_deaths
                .iter()
                .filter(|(t, n)| **n >= crate::eval::MAX_WORKER_DEATHS && !rec.results.contains_key(*t))
                .filter(|(t, _)| !self.fence.is_pending(id, t))
                .map(|(t, n)| (t.clone(), *n))
                .collect();
            for (t, n) in crashed {
                self.record_crash(now, id, &t, n, out);
            }
        }
    }

    /// A takeover while this node does not see a majority waits until it does (the failed node
    /// may only be cut off from this node, and the majority's owner takes over).
    pub(super) fn take_over_fenced(&mut self, now: Now, failed: SocketAddr, out: &mut Vec<Action>) {
        if self.quorum() {
            self.take_over(now, failed, out);
        } else {
            tracing::info!(failed = %failed, "no majority of members live: the takeover waits");
            self.fence.deferred.insert(failed);
        }
    }

    /// Deferred takeovers of nodes still down, once this node sees a majority again.
    pub(super) fn resume_deferred(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.fence.deferred.is_empty() || !self.quorum() {
            return;
        }
        for failed in std::mem::take(&mut self.fence.deferred) {
            if !self.peers.contains(&failed) {
                self.take_over(now, failed, out);
            }
        }
    }

    /// Sends the proposals due: those made in this step, and every `announce_every` again those
    /// not answered yet (one record delta per evaluation and member).
    pub(super) fn send_proposals(&mut self, now: Now, out: &mut Vec<Action>) {
        let resend = self.fence.next_resend.is_none_or(|t| now.mono >= t);
        let mut evals = std::mem::take(&mut self.fence.propose);
        if resend {
            self.fence.next_resend = Some(now.mono + self.cfg.announce_every);
            evals.extend(self.fence.pending.keys().chain(self.fence.phase1.keys()).copied());
        }
        let me = self.me();
        let voters = self.live_voters();
        for eval in evals {
            let Some(rec) = self.evals.get(&eval).filter(|r| r.responsible == me) else {
                self.fence.forget(eval);
                continue;
            };
            let mut copy = rec.clone_header();
            let pending = self.fence.pending.get(&eval);
            for (t, p) in pending.into_iter().flatten() {
                copy.results.insert(t.clone(), p.result.clone());
            }
            let targets: Vec<SocketAddr> = match self.fence.phase1.get(&eval) {
                Some(p) => p.waiting.iter().copied().collect(),
                None => voters.iter().copied().collect(),
            };
            for to in targets {
                let done = pending.is_some_and(|p| !p.is_empty() && p.values().all(|x| x.acks.contains(&to)));
                if !done {
                    out.push(Action::Propose { to, copy: copy.clone() });
                }
            }
        }
    }

    /// A proposal from member `from`: holds its provisional results if this copy names `from`
    /// responsible at the proposal's term; answers with this node's copy (whole, for a
    /// header-only proposal) and the provisional results it holds.
    pub(super) fn proposed(&mut self, copy: EvalRecord, from: SocketAddr, out: &mut Vec<Action>) {
        let id = copy.id;
        if copy.validate().is_err() || copy.responsible != from {
            tracing::warn!(eval = %id, peer = %from, "refusing a proposal for a record the sender does not own");
            return;
        }
        let (term, responsible) = (copy.term, copy.responsible);
        self.merge(vec![copy.clone_header()], from, out);
        let Some(mine) = self.evals.get(&id) else { return };
        let owner = mine.term == term && mine.responsible == responsible;
        let held = self.fence.held.entry(id).or_default();
        held.retain(|t, _| !mine.results.contains_key(t));
        for (t, result) in &copy.results {
            let newer = held.get(t).is_none_or(|h| h.term <= term);
            if owner && newer && mine.knows_task(t) && !mine.results.contains_key(t) {
                held.insert(t.clone(), Held { term, result: result.clone() });
            }
        }
        let tasks: Vec<&TaskId> = copy.results.keys().collect();
        let (record, proposals) = if tasks.is_empty() {
            (mine.clone(), held.clone())
        } else {
            let mine_tasks = held.iter().filter(|(t, _)| copy.results.contains_key(*t));
            (mine.delta(tasks), mine_tasks.map(|(t, h)| (t.clone(), h.clone())).collect())
        };
        if held.is_empty() {
            self.fence.held.remove(&id);
        }
        out.push(Action::Vote(Vote { record, proposals }));
    }

    /// A member's vote for this node's proposal: counts the acknowledgements of the provisional
    /// results it holds, learns what else it holds (results, provisional results in a first
    /// phase, a higher term), and stores the results a majority holds.
    pub(super) fn voted(&mut self, now: Now, vote: Vote, from: SocketAddr, out: &mut Vec<Action>) {
        let Vote { record: copy, proposals } = vote;
        let id = copy.id;
        let me = self.me();
        let current = copy.responsible == me && self.evals.get(&id).is_some_and(|r| r.term == copy.term);
        if current && let Some(pending) = self.fence.pending.get_mut(&id) {
            for (task, p) in pending.iter_mut() {
                if proposals.get(task).is_some_and(|h| h.term == p.term && same_result(&h.result, &p.result))
                {
                    p.acks.insert(from);
                }
            }
        }
        if current && let Some(p) = self.fence.phase1.get_mut(&id) {
            p.waiting.remove(&from);
            p.answered.insert(from);
            for (t, h) in proposals {
                p.learn(t, h);
            }
        }
        self.merge(vec![copy], from, out);
        if self.evals.get(&id).is_none_or(|r| r.responsible != me) {
            self.fence.forget(id);
            return;
        }
        self.commit_majority(now, id, out);
    }

    /// Stores every provisional result a majority now holds. Also when no vote arrives: the
    /// members that count can shrink (a failed one stops counting after `quorum_hold`), and a
    /// result this node alone holds is then enough.
    pub(super) fn commit_ready(&mut self, now: Now, out: &mut Vec<Action>) {
        let evals: Vec<EvalId> = self.fence.pending.keys().copied().collect();
        for eval in evals {
            self.commit_majority(now, eval, out);
        }
    }

    /// Stores the provisional results of `eval` that a majority holds; drops those whose task
    /// got another result meanwhile.
    fn commit_majority(&mut self, now: Now, eval: EvalId, out: &mut Vec<Action>) {
        let majority = self.majority();
        let Some(rec) = self.evals.get(&eval) else { return };
        let Some(pending) = self.fence.pending.get_mut(&eval) else { return };
        pending.retain(|t, _| !rec.results.contains_key(t));
        let ready: Vec<TaskId> =
            pending.iter().filter(|(_, p)| p.acks.len() + 1 >= majority).map(|(t, _)| t.clone()).collect();
        let mut commits = Vec::new();
        for t in ready {
            if let Some(p) = pending.remove(&t) {
                commits.push((t, p.result));
            }
        }
        if pending.is_empty() {
            self.fence.pending.remove(&eval);
        }
        for (t, result) in commits {
            self.store_result(now, eval, &t, result, out);
        }
    }
}
