use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cdtester_runner_api::{Limits, Outcome};

use super::*;
use crate::eval::tests::module_report;
use crate::wire::{NodeId, NodeIdData, TaskConfirmData, TaskInfo, TaskSendData, TaskSourceKind};

pub(super) fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + i))
}

pub(super) fn config(me: SocketAddr, slots: usize) -> EngineConfig {
    EngineConfig {
        me,
        http_port: 8000,
        slots,
        confirm_timeout: Duration::from_millis(1500),
        announce_every: Duration::from_millis(500),
        hold: Duration::from_secs(6),
        open: false,
        quorum_hold: Duration::from_secs(300),
    }
}

pub(super) fn submission(id: EvalId, me: SocketAddr, wall: f64) -> EvalRecord {
    let project = ProjectRecord {
        id: ProjectId::of(id, 0),
        name: "calc".into(),
        url: None,
        content_hash: "a".repeat(64),
        state: ProjectState::Preparing,
    };
    EvalRecord::new(id, NodeAddr::from(me), wall, vec![project])
}

pub(super) fn discovery(modules: &[&str]) -> Discovery {
    Discovery {
        modules: modules.iter().map(|m| m.to_string()).collect(),
        runner: "local".into(),
        limits: Limits::default(),
        policies: Vec::new(),
    }
}

struct Clock(Instant, f64);

impl Clock {
    fn now(&self) -> Now {
        Now { mono: self.0, wall: self.1 }
    }
    fn advance(&mut self, ms: u64) {
        self.0 += Duration::from_millis(ms);
        self.1 += ms as f64 / 1000.0;
    }
}

fn runs(actions: &[Action]) -> Vec<Task> {
    actions.iter().filter_map(|a| if let Action::Run(t) = a { Some(t.clone()) } else { None }).collect()
}

fn post_for(worker: SocketAddr, task: &Task, outcomes: &[Outcome]) -> TaskPost {
    let report = module_report(task.task_id.module(), outcomes);
    TaskPost::new(worker, task.eval, &task.task_id, Ok(report), "x".into())
}

/// The vote of a member that holds the proposal `copy`.
fn holding(copy: &EvalRecord) -> Vote {
    let held = |(t, r): (&TaskId, &crate::eval::ModuleResult)| {
        (t.clone(), Held { term: copy.term, result: r.clone() })
    };
    Vote { record: copy.clone_header(), proposals: copy.results.iter().map(held).collect() }
}

/// Every member the engine proposed to holds the proposal and votes for it.
fn votes_for(e: &mut Engine, clock: &Clock, actions: &[Action]) -> Vec<Action> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Propose { to, copy } = a {
            out.extend(e.handle(clock.now(), Input::Voted { vote: holding(copy), from: *to }));
        }
    }
    out
}

fn answer(actions: &[Action]) -> Result<Accepted, Refusal> {
    actions
        .iter()
        .find_map(|a| if let Action::Answer(r) = a { Some(r.clone()) } else { None })
        .expect("an answer")
}

/// Evaluation 5 of one project, submitted to `e` and discovered with `modules`: what the
/// discovery made the engine do.
fn submit_and_discover(e: &mut Engine, clock: &Clock, modules: &[&str]) -> Vec<Action> {
    let out = e.handle(clock.now(), Input::Submitted(submission(EvalId::test(5), addr(0), clock.1)));
    assert!(
        out.iter().any(|a| matches!(a, Action::Discover { eval, .. } if *eval == EvalId::test(5))),
        "{out:?}"
    );
    e.handle(
        clock.now(),
        Input::Discovered {
            eval: EvalId::test(5),
            project: ProjectId::of(EvalId::test(5), 0),
            outcome: Ok(discovery(modules)),
        },
    )
}

fn started_engine(slots: usize, modules: &[&str]) -> (Engine, Clock, Vec<Action>) {
    let clock = Clock(Instant::now(), 1000.0);
    let mut e = Engine::new(config(addr(0), slots), Vec::new(), Default::default(), Vec::new(), clock.0);
    let out = submit_and_discover(&mut e, &clock, modules);
    (e, clock, out)
}

#[test]
fn own_slots_take_tasks_at_once_and_a_freed_slot_is_refilled_in_the_same_step() {
    let (mut e, clock, out) = started_engine(2, &["t_a.py", "t_b.py", "t_c.py"]);
    let first = runs(&out);
    assert_eq!(first.len(), 2, "both slots start without a round trip: {out:?}");
    assert_eq!(e.busy(), 2);
    let out = e.handle(
        clock.now(),
        Input::Ran { post: post_for(addr(0), &first[0], &[Outcome::Passed]), from: None },
    );
    assert!(out.iter().any(|a| matches!(a, Action::Persist(r) if r.results.len() == 1)), "{out:?}");
    assert!(
        !out.iter().any(|a| matches!(a, Action::DeliverBatch { .. })),
        "a local result needs no delivery"
    );
    let next = runs(&out);
    assert_eq!(next.len(), 1, "the freed slot takes the last task: {out:?}");
    for t in [&first[1], &next[0]] {
        e.handle(clock.now(), Input::Ran { post: post_for(addr(0), t, &[Outcome::Failed]), from: None });
    }
    let rec = e.record(EvalId::test(5)).expect("record");
    assert!(rec.end_time.is_some(), "{rec:?}");
    assert_eq!(rec.counts().failures(), 2);
    assert_eq!(e.busy(), 0);
}

#[test]
fn remembered_small_modules_of_a_project_run_along_on_one_slot_up_to_a_fair_share() {
    use cdtester_runner_api::plan::ModuleStat;
    let clock = Clock(Instant::now(), 1000.0);
    // Ten small modules of 0.5 s and one slow one of 30 s; 2 slots, no peers.
    let mut names: Vec<String> = (0..10).map(|i| format!("t_{i}.py")).collect();
    names.push("t_slow.py".into());
    let mut durations: HashMap<String, ModuleStat> =
        names.iter().map(|m| (duration_key("calc", m), ModuleStat { secs: 0.5, tests: 3 })).collect();
    durations.insert(duration_key("calc", "t_slow.py"), ModuleStat { secs: 30.0, tests: 1 });
    let mut e = Engine::new(config(addr(0), 2), Vec::new(), durations, Vec::new(), clock.0);
    let modules: Vec<&str> = names.iter().map(String::as_str).collect();
    let out = submit_and_discover(&mut e, &clock, &modules);
    let first = runs(&out);
    assert_eq!(first.len(), 2, "{out:?}");
    let slow = first.iter().find(|t| t.task_id.module() == "t_slow.py").expect("the slow module goes first");
    assert!(slow.with.is_empty(), "a slow module runs alone");
    let small = first.iter().find(|t| t.task_id.module() != "t_slow.py").expect("a small one");
    // Waiting when the slow one has left: 10 x 0.5 s over 2 slots = 2.5 s a slot: the small
    // one takes 4 more along (5 x 0.5 s).
    assert_eq!(small.with.len(), 4, "{small:?}");
    let rec = e.record(EvalId::test(5)).expect("record");
    for c in &small.with {
        assert_eq!(rec.running.get(c), Some(&NodeAddr::from(addr(0))), "published as running here");
    }
    // The companions report first, the task last; only then is the slot free again.
    for c in small.with.clone() {
        let along = Task { task_id: c.clone(), with: Vec::new(), ..small.clone() };
        let out =
            e.handle(clock.now(), Input::RanAlong { post: post_for(addr(0), &along, &[Outcome::Passed]) });
        assert!(runs(&out).is_empty(), "a companion frees no slot: {out:?}");
    }
    assert_eq!(e.busy(), 2);
    let out =
        e.handle(clock.now(), Input::Ran { post: post_for(addr(0), small, &[Outcome::Passed]), from: None });
    let next = runs(&out);
    assert_eq!(next.len(), 1, "{out:?}");
    // 5 x 0.5 s left over 2 slots: 1.25 s a slot, the tail in smaller groups.
    assert_eq!(next[0].with.len(), 1, "{next:?}");
    assert_eq!(e.record(EvalId::test(5)).expect("record").results.len(), 5);
}

#[test]
fn a_task_send_naming_a_module_the_project_lacks_is_not_confirmed() {
    let (mut e, clock, _) = started_engine(3, &["tests/t_a.py"]);
    let send = |module: &str| {
        let info = TaskInfo {
            project_id: "5-0".into(),
            module: module.into(),
            project_name: "p".into(),
            api_port: "1".into(),
            eval_id: Some("5".into()),
            url: None,
            token: None,
            kind: TaskSourceKind::Zip,
        };
        Input::Message {
            from: addr(1),
            msg: Message::TaskSend(TaskSendData { id: NodeId("n1".into()), info }),
        }
    };
    let confirms =
        |out: &[Action]| out.iter().any(|a| matches!(a, Action::Send { msg: Message::TaskConfirm(_), .. }));
    // The reference's name for the module (its file name): not this project's module.
    let out = e.handle(clock.now(), send("t_a.py"));
    assert!(!confirms(&out), "{out:?}");
    let out = e.handle(clock.now(), send("tests/t_a.py"));
    assert!(confirms(&out), "{out:?}");
}

#[test]
fn results_only_from_the_assigned_worker_and_only_the_first() {
    let (mut e, mut clock, _) = started_engine(0, &["t_a.py"]);
    let me = Input::Members { id: Some(NodeId("node-0".into())), peers: vec![addr(1), addr(2)] };
    e.handle(clock.now(), me);
    let out = e.handle(
        clock.now(),
        Input::Message { from: addr(1), msg: Message::TaskRequest(NodeIdData { id: NodeId("n1".into()) }) },
    );
    let Some(Action::Send { to, msg: Message::TaskSend(send) }) = out.first() else { panic!("{out:?}") };
    assert_eq!(*to, addr(1));
    let task_id = TaskId::from_parts(&send.info.project_id, &send.info.module).expect("a task id");
    assert_eq!(task_id, TaskId::test("5-0::t_a.py"));
    let task =
        Task { eval: EvalId::test(5), task_id: task_id.clone(), project: None, from: None, with: Vec::new() };
    let confirm = Message::TaskConfirm(TaskConfirmData { task_id: task_id.to_string() });
    e.handle(clock.now(), Input::Message { from: addr(1), msg: confirm });
    assert_eq!(
        e.record(EvalId::test(5)).expect("record").running.get(&task_id),
        Some(&NodeAddr::from(addr(1)))
    );
    clock.advance(10);
    let forged = post_for(addr(2), &task, &[Outcome::Passed]);
    let out = e.handle(clock.now(), Input::Result { post: forged.clone(), caller: addr(2) });
    assert!(matches!(answer(&out), Err(Refusal::Forbidden(_))), "{out:?}");
    let out = e.handle(clock.now(), Input::Result { post: forged, caller: addr(1) });
    assert!(matches!(answer(&out), Err(Refusal::Forbidden(_))), "the post names another worker: {out:?}");
    let forged_flaky = post_for(addr(1), &task, &[Outcome::Flaky]);
    let out = e.handle(clock.now(), Input::Result { post: forged_flaky, caller: addr(1) });
    assert!(matches!(answer(&out), Err(Refusal::BadRequest(_))), "flaky without attempts: {out:?}");
    let good = post_for(addr(1), &task, &[Outcome::Failed]);
    let out = e.handle(clock.now(), Input::Result { post: good.clone(), caller: addr(1) });
    assert_eq!(answer(&out), Ok(Accepted::Stored));
    assert!(e.record(EvalId::test(5)).expect("record").results.is_empty(), "stored once a majority holds it");
    votes_for(&mut e, &clock, &out);
    let again = post_for(addr(1), &task, &[Outcome::Passed]);
    assert_eq!(
        answer(&e.handle(clock.now(), Input::Result { post: again, caller: addr(1) })),
        Ok(Accepted::Duplicate)
    );
    assert_eq!(e.record(EvalId::test(5)).expect("record").counts().failures(), 1, "the first result stays");
}

#[test]
fn a_dead_worker_counts_a_death_and_its_task_goes_to_the_next_one() {
    let (mut e, clock, _) = started_engine(0, &["t_a.py"]);
    e.handle(
        clock.now(),
        Input::Members { id: Some(NodeId("node-0".into())), peers: vec![addr(1), addr(2)] },
    );
    for (worker, expected_deaths) in [(addr(1), 1), (addr(2), 2)] {
        let req = Message::TaskRequest(NodeIdData { id: NodeId("n".into()) });
        let out = e.handle(clock.now(), Input::Message { from: worker, msg: req });
        assert!(matches!(out.first(), Some(Action::Send { msg: Message::TaskSend(_), .. })), "{out:?}");
        let confirm = Message::TaskConfirm(TaskConfirmData { task_id: "5-0::t_a.py".into() });
        e.handle(clock.now(), Input::Message { from: worker, msg: confirm });
        let out = e.handle(clock.now(), Input::PeerDown { addr: worker, died: true });
        votes_for(&mut e, &clock, &out);
        let rec = e.record(EvalId::test(5)).expect("record");
        assert_eq!(rec.worker_deaths.get(&TaskId::test("5-0::t_a.py")), Some(&expected_deaths));
        assert!(rec.running.is_empty());
    }
    let rec = e.record(EvalId::test(5)).expect("record");
    let note = rec.results[&TaskId::test("5-0::t_a.py")].report.note.clone().unwrap_or_default();
    assert!(note.contains("crashed"), "{note}");
    assert!(rec.end_time.is_some());
}

#[test]
fn an_unconfirmed_task_is_handed_out_again_after_the_confirm_timeout() {
    let (mut e, mut clock, _) = started_engine(0, &["t_a.py"]);
    e.handle(
        clock.now(),
        Input::Members { id: Some(NodeId("node-0".into())), peers: vec![addr(1), addr(2)] },
    );
    let req = || Message::TaskRequest(NodeIdData { id: NodeId("n".into()) });
    let out = e.handle(clock.now(), Input::Message { from: addr(1), msg: req() });
    assert_eq!(out.len(), 1);
    assert!(e.handle(clock.now(), Input::Message { from: addr(2), msg: req() }).is_empty(), "nothing left");
    clock.advance(2000);
    e.handle(clock.now(), Input::Tick);
    let out = e.handle(clock.now(), Input::Message { from: addr(2), msg: req() });
    assert!(matches!(out.first(), Some(Action::Send { to, .. }) if *to == addr(2)), "{out:?}");
}

fn members(e: &mut Engine, clock: &Clock, peers: &[SocketAddr]) -> Vec<Action> {
    e.handle(clock.now(), Input::Members { id: Some(NodeId("me".into())), peers: peers.to_vec() })
}

fn proposals(actions: &[Action]) -> Vec<(SocketAddr, EvalRecord)> {
    actions
        .iter()
        .filter_map(|a| if let Action::Propose { to, copy } = a { Some((*to, copy.clone())) } else { None })
        .collect()
}

#[test]
fn a_node_cut_off_from_the_majority_neither_schedules_nor_stores_until_it_sees_one() {
    let clock = Clock(Instant::now(), 1000.0);
    let mut e = Engine::new(config(addr(0), 1), Vec::new(), Default::default(), Vec::new(), clock.0);
    members(&mut e, &clock, &[addr(1), addr(2), addr(3), addr(4)]);
    let out = submit_and_discover(&mut e, &clock, &["t_a.py", "t_b.py"]);
    let first = runs(&out);
    assert_eq!(first.len(), 1, "{out:?}");
    members(&mut e, &clock, &[]);
    let post = post_for(addr(0), &first[0], &[Outcome::Passed]);
    let out = e.handle(clock.now(), Input::Ran { post: post.clone(), from: None });
    assert_eq!(e.undelivered(), 1, "kept for later: {out:?}");
    assert!(runs(&out).is_empty() && proposals(&out).is_empty(), "{out:?}");
    assert!(e.record(EvalId::test(5)).expect("record").results.is_empty());
    let out = members(&mut e, &clock, &[addr(1), addr(2)]);
    assert_eq!(runs(&out).len(), 1, "three of five live: scheduling again: {out:?}");
    let out = e.handle(clock.now(), Input::Result { post, caller: addr(0) });
    assert_eq!(answer(&out), Ok(Accepted::Stored));
    let sent = proposals(&out);
    assert_eq!(sent.iter().map(|(to, _)| *to).collect::<Vec<_>>(), vec![addr(1), addr(2)]);
    e.handle(clock.now(), Input::Voted { vote: holding(&sent[0].1), from: sent[0].0 });
    assert!(e.record(EvalId::test(5)).expect("record").results.is_empty(), "two of five hold it: not yet");
    e.handle(clock.now(), Input::Voted { vote: holding(&sent[1].1), from: sent[1].0 });
    assert_eq!(e.record(EvalId::test(5)).expect("record").results.len(), 1, "three of five hold it: stored");
}

#[test]
fn a_result_held_alone_is_stored_once_the_only_other_member_stops_counting() {
    // Two members; the other one dies before it votes: no vote ever comes. Once it has been
    // down for `quorum_hold` it stops counting, and this node alone is the majority.
    let mut clock = Clock(Instant::now(), 1000.0);
    let mut e = Engine::new(config(addr(0), 1), Vec::new(), Default::default(), Vec::new(), clock.0);
    members(&mut e, &clock, &[addr(1)]);
    let out = submit_and_discover(&mut e, &clock, &["t_a.py"]);
    let task = runs(&out).pop().expect("a task");
    let out =
        e.handle(clock.now(), Input::Ran { post: post_for(addr(0), &task, &[Outcome::Passed]), from: None });
    assert_eq!(proposals(&out).len(), 1, "proposed to the other member: {out:?}");
    members(&mut e, &clock, &[]);
    e.handle(clock.now(), Input::Tick);
    assert!(e.record(EvalId::test(5)).expect("record").results.is_empty(), "one of two holds it: not yet");
    clock.advance(300_000 - 1);
    e.handle(clock.now(), Input::Tick);
    assert!(e.record(EvalId::test(5)).expect("record").results.is_empty(), "the dead member still counts");
    clock.advance(2);
    e.handle(clock.now(), Input::Tick);
    let rec = e.record(EvalId::test(5)).expect("record");
    assert_eq!(rec.results.len(), 1, "stored without any vote once it stopped counting");
    assert!(rec.end_time.is_some(), "{rec:?}");
}

#[test]
fn a_stale_owner_learns_the_higher_term_from_a_vote_and_stores_nothing() {
    let (mut e, mut clock, out) = started_engine(1, &["t_a.py"]);
    let task = runs(&out).remove(0);
    members(&mut e, &clock, &[addr(1), addr(2), addr(3), addr(4)]);
    let out =
        e.handle(clock.now(), Input::Ran { post: post_for(addr(0), &task, &[Outcome::Passed]), from: None });
    let sent = proposals(&out);
    assert_eq!(sent.len(), 4, "{out:?}");
    e.handle(clock.now(), Input::Voted { vote: holding(&sent[1].1), from: addr(2) });
    let mut newer = e.record(EvalId::test(5)).expect("record").clone_header();
    newer.term = 2;
    newer.version = 0;
    newer.responsible = NodeAddr::from(addr(1));
    e.handle(
        clock.now(),
        Input::Voted { vote: Vote { record: newer, proposals: Default::default() }, from: addr(1) },
    );
    let rec = e.record(EvalId::test(5)).expect("record");
    assert_eq!((rec.term, rec.responsible), (2, NodeAddr::from(addr(1))));
    assert!(rec.results.is_empty(), "a stale owner's result is never stored: {rec:?}");
    clock.advance(1000);
    let out = e.handle(clock.now(), Input::Tick);
    assert!(proposals(&out).is_empty() && runs(&out).is_empty(), "no longer the owner: {out:?}");
}

#[test]
fn a_member_takes_a_proposal_only_from_the_owner_at_its_term() {
    let (origin, clock, out) = started_engine(1, &["t_a.py"]);
    let task = runs(&out).remove(0);
    let mut peer = Engine::new(config(addr(1), 1), Vec::new(), Default::default(), Vec::new(), clock.0);
    let mut taken = origin.record(EvalId::test(5)).expect("record").clone();
    taken.term = 2;
    taken.responsible = NodeAddr::from(addr(2));
    peer.handle(clock.now(), Input::Merge { records: vec![taken], from: addr(2) });
    let mut stale = origin.record(EvalId::test(5)).expect("record").clone_header();
    let report = crate::eval::tests::module_report(task.task_id.module(), &[Outcome::Passed]);
    let result = crate::eval::ModuleResult {
        node: NodeAddr::from(addr(0)),
        attempt: "a".into(),
        finished_at: 1.0,
        report,
    };
    stale.results.insert(task.task_id.clone(), result);
    let out = peer.handle(clock.now(), Input::Propose { copy: stale.clone(), from: addr(0) });
    let Some(Action::Vote(vote)) = out.iter().find(|a| matches!(a, Action::Vote(_))) else {
        panic!("{out:?}")
    };
    assert_eq!((vote.record.term, vote.record.results.len()), (2, 0), "refused: {vote:?}");
    assert!(vote.proposals.is_empty(), "{vote:?}");
    assert!(peer.record(EvalId::test(5)).expect("record").results.is_empty());
    let out = peer.handle(clock.now(), Input::Propose { copy: stale, from: addr(3) });
    assert!(!out.iter().any(|a| matches!(a, Action::Vote(_))), "only the record's owner proposes: {out:?}");
}

#[test]
fn a_takeover_learns_every_live_members_results_before_it_schedules() {
    let (mut origin, clock, out) = started_engine(1, &["t_a.py", "t_b.py"]);
    let task = runs(&out).remove(0);
    let done = origin
        .handle(clock.now(), Input::Ran { post: post_for(addr(0), &task, &[Outcome::Passed]), from: None });
    let with_result = origin.record(EvalId::test(5)).expect("record").clone();
    assert_eq!(with_result.results.len(), 1, "alone, a node is its own majority: {done:?}");
    let mut before = with_result.clone();
    before.results.clear();
    let mut e = Engine::new(config(addr(1), 1), Vec::new(), Default::default(), Vec::new(), clock.0);
    members(&mut e, &clock, &[addr(0), addr(2)]);
    e.handle(clock.now(), Input::Merge { records: vec![before], from: addr(0) });
    members(&mut e, &clock, &[addr(2)]);
    let out = e.handle(clock.now(), Input::TakeOver { failed: addr(0) });
    assert!(runs(&out).is_empty(), "nothing runs before the members answered: {out:?}");
    let sent = proposals(&out);
    assert_eq!(sent.len(), 1);
    let term = sent[0].1.term;
    assert!(sent[0].1.results.is_empty() && term > 1, "{sent:?}");
    let mut vote = with_result;
    vote.term = term;
    vote.responsible = NodeAddr::from(addr(1));
    let out = e.handle(
        clock.now(),
        Input::Voted { vote: Vote { record: vote, proposals: Default::default() }, from: addr(2) },
    );
    let next = runs(&out);
    assert_eq!(next.len(), 1, "{out:?}");
    assert_ne!(next[0].task_id, task.task_id, "the task with a result is not run again");
}

#[test]
fn a_restarted_node_counts_the_members_it_remembers_and_alone_is_no_majority() {
    // A node of five that schedules an evaluation remembers the members it counts.
    let (mut e, mut clock, _) = started_engine(1, &["t_a.py", "t_b.py"]);
    let out = members(&mut e, &clock, &[addr(1), addr(2), addr(3), addr(4)]);
    let remembered: Vec<Vec<SocketAddr>> = out
        .iter()
        .filter_map(|a| if let Action::RememberMembers(m) = a { Some(m.clone()) } else { None })
        .collect();
    let all = vec![addr(1), addr(2), addr(3), addr(4)];
    assert_eq!(remembered, vec![all.clone()], "{out:?}");
    assert!(members(&mut e, &clock, &all).is_empty(), "handed out once, not again unchanged");
    let stored = e.record(EvalId::test(5)).expect("record").clone();
    // It restarts with its store and those members, and sees none of them (its join has not
    // completed, or it is cut off): after the hold it must neither run nor store anything.
    let mut e = Engine::new(config(addr(0), 1), vec![stored], Default::default(), all, clock.0);
    members(&mut e, &clock, &[]);
    clock.advance(7_000);
    let out = e.handle(clock.now(), Input::Tick);
    assert!(runs(&out).is_empty(), "alone, one of five members schedules nothing: {out:?}");
    let rec = e.record(EvalId::test(5)).expect("record");
    assert!(rec.results.is_empty(), "{rec:?}");
    // Two members come back: three of five, the evaluation resumes with a first phase (its
    // header-only proposal goes out again at the next resend).
    clock.advance(1_000);
    let out = members(&mut e, &clock, &[addr(1), addr(2)]);
    assert!(runs(&out).is_empty(), "{out:?}");
    let sent: Vec<SocketAddr> = proposals(&out).into_iter().map(|(to, _)| to).collect();
    assert_eq!(sent, vec![addr(1), addr(2)], "{out:?}");
}

#[test]
fn a_takeover_learns_the_proposals_the_node_taking_over_holds_itself() {
    // The owner (0) proposed a result; this node (1) took the proposal. The owner dies, and the
    // only other live member (2) holds nothing (it restarted): this node's own copy is the one
    // that says the task has a result a majority may have stored.
    let (mut origin, clock, out) = started_engine(1, &["t_a.py", "t_b.py"]);
    let task = runs(&out).remove(0);
    origin.handle(clock.now(), Input::Ran { post: post_for(addr(0), &task, &[Outcome::Passed]), from: None });
    let proposal = origin.record(EvalId::test(5)).expect("record").clone();
    let attempt = proposal.results.get(&task.task_id).expect("the owner's result").attempt.clone();
    let mut e = Engine::new(config(addr(1), 1), Vec::new(), Default::default(), Vec::new(), clock.0);
    members(&mut e, &clock, &[addr(0), addr(2)]);
    let out = e.handle(clock.now(), Input::Propose { copy: proposal, from: addr(0) });
    let held = out.iter().any(|a| matches!(a, Action::Vote(v) if v.proposals.contains_key(&task.task_id)));
    assert!(held, "{out:?}");
    members(&mut e, &clock, &[addr(2)]);
    let out = e.handle(clock.now(), Input::TakeOver { failed: addr(0) });
    let sent = proposals(&out);
    assert_eq!(sent.len(), 1, "{out:?}");
    let answer = Vote { record: sent[0].1.clone(), proposals: Default::default() };
    let out = e.handle(clock.now(), Input::Voted { vote: answer, from: addr(2) });
    assert!(runs(&out).iter().all(|t| t.task_id != task.task_id), "the task is not run again: {out:?}");
    let again = proposals(&out);
    let proposed = again.iter().filter_map(|(_, copy)| copy.results.get(&task.task_id)).collect::<Vec<_>>();
    assert!(!proposed.is_empty() && proposed.iter().all(|r| r.attempt == attempt), "{out:?}");
}

/// JSON and back, as between nodes (floats may change in their last bit).
fn over_http<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    serde_json::from_str(&serde_json::to_string(v).expect("serializes")).expect("parses")
}

/// Carries every proposal in `actions` to `peer` and its vote back to `e`, through JSON.
fn vote_with(e: &mut Engine, peer: &mut Engine, clock: &Clock, actions: &[Action]) {
    for (to, copy) in proposals(actions) {
        let out = peer.handle(clock.now(), Input::Propose { copy: over_http(&copy), from: e.cfg.me });
        for a in out {
            if let Action::Vote(vote) = a {
                e.handle(clock.now(), Input::Voted { vote: over_http(&vote), from: to });
            }
        }
    }
}

#[test]
fn results_for_one_node_go_together_and_each_is_checked_alone() {
    let (mut r, mut clock, _) = started_engine(0, &["t_a.py", "t_b.py"]);
    let mut w = Engine::new(config(addr(1), 2), Vec::new(), Default::default(), Vec::new(), clock.0);
    members(&mut r, &clock, &[addr(1)]);
    members(&mut w, &clock, &[addr(0)]);
    let rec = r.record(EvalId::test(5)).expect("record").clone();
    w.handle(clock.now(), Input::Merge { records: vec![rec], from: addr(0) });
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let req = Message::TaskRequest(NodeIdData { id: NodeId("w".into()) });
        for a in r.handle(clock.now(), Input::Message { from: addr(1), msg: req }) {
            let Action::Send { msg: send @ Message::TaskSend(_), .. } = a else { continue };
            for b in w.handle(clock.now(), Input::Message { from: addr(0), msg: send }) {
                match b {
                    Action::Run(t) => tasks.push(t),
                    Action::Send { msg, .. } => {
                        r.handle(clock.now(), Input::Message { from: addr(1), msg });
                    }
                    _ => {}
                }
            }
        }
    }
    assert_eq!(tasks.len(), 2);
    for t in &tasks {
        let out = w
            .handle(clock.now(), Input::Ran { post: post_for(addr(1), t, &[Outcome::Passed]), from: t.from });
        assert!(
            out.iter().any(|a| matches!(a, Action::DeliverBatch { posts, .. } if posts.len() == 1)),
            "{out:?}"
        );
    }
    clock.advance(250);
    let out = w.handle(clock.now(), Input::Tick);
    let batches: Vec<(SocketAddr, Vec<TaskPost>)> = out
        .into_iter()
        .filter_map(|a| if let Action::DeliverBatch { to, posts } = a { Some((to, posts)) } else { None })
        .collect();
    assert_eq!(batches.len(), 1, "the unanswered results go again, together: {batches:?}");
    let (to, mut posts) = batches.into_iter().next().expect("a batch");
    assert_eq!((to, posts.len()), (addr(0), 2));
    let mut forged = posts[0].clone();
    forged.result.port = "7002".into();
    posts.push(forged);
    posts.push(posts[0].clone());
    let mut answers = Vec::new();
    for post in over_http(&posts) {
        let out = r.handle(clock.now(), Input::Result { post: post.clone(), caller: addr(1) });
        answers.push(over_http(&BatchAnswer::new(&post, &answer(&out))));
        vote_with(&mut r, &mut w, &clock, &out);
    }
    let statuses: Vec<Option<Accepted>> = answers.iter().map(|a| a.outcome.as_ref().ok().copied()).collect();
    assert_eq!(
        statuses,
        vec![Some(Accepted::Stored), Some(Accepted::Stored), None, Some(Accepted::Duplicate)]
    );
    assert!(answers[2].outcome.as_ref().is_err_and(|e| e.contains("sent by")), "{answers:?}");
    assert_eq!(
        r.record(EvalId::test(5)).expect("record").results.len(),
        2,
        "both stored once the worker voted"
    );
    w.handle(clock.now(), Input::Delivered(answers));
    assert_eq!(w.undelivered(), 0);
}

#[test]
fn only_cdtester_peers_vote_reference_ones_never_answer_proposals() {
    let (mut e, clock, out) = started_engine(1, &["t_a.py", "t_b.py"]);
    let task = runs(&out).remove(0);
    e.handle(clock.now(), Input::Voters(vec![addr(1)]));
    members(&mut e, &clock, &[addr(1), addr(2)]);
    let post = post_for(addr(0), &task, &[Outcome::Passed]);
    let out = e.handle(clock.now(), Input::Ran { post, from: None });
    let sent = proposals(&out);
    assert_eq!(sent.iter().map(|(to, _)| *to).collect::<Vec<_>>(), vec![addr(1)], "{out:?}");
    e.handle(clock.now(), Input::Voted { vote: holding(&sent[0].1), from: addr(1) });
    assert_eq!(e.record(EvalId::test(5)).expect("record").results.len(), 1, "two of two voters hold it");
}
