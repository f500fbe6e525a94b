//! Deterministic simulation of the protocol core: 3-50 nodes, simulated time, loss, duplication,
//! reordering, partitions, crashes, stalls and leaves.

use cdtester::core::Event;
use cdtester::core::sim::{NetConfig, Sim};
use cdtester::wire::NodeId;
use cdtester_config::Timers;

fn lossy(seed: u64) -> NetConfig {
    NetConfig { loss: 0.10, duplicate: 0.05, min_delay_ms: 1, max_delay_ms: 40, seed, ..NetConfig::default() }
}

fn ids(sim: &Sim, nodes: &[usize]) -> Vec<NodeId> {
    nodes.iter().map(|&i| sim.id(i).expect("joined")).collect()
}

/// Every running node agrees on one live owner for `failed`, and exactly one node holds it
/// (TakeOver − Relinquish summed over all nodes, crashed ones included, is 1 and the holder
/// is the agreed owner).
fn assert_single_owner(sim: &Sim, failed: &NodeId) {
    let running = sim.running();
    let owners: Vec<Option<NodeId>> =
        running.iter().map(|&i| sim.core(i).owner_of(failed).cloned()).collect();
    let first = owners[0].clone().unwrap_or_else(|| panic!("no owner for {failed}: {owners:?}"));
    assert!(owners.iter().all(|o| o.as_ref() == Some(&first)), "owners disagree for {failed}: {owners:?}");
    let holders: Vec<usize> = running.iter().copied().filter(|&i| sim.ownership(i, failed) > 0).collect();
    assert_eq!(holders.len(), 1, "holders of {failed}: {holders:?}");
    assert_eq!(sim.id(holders[0]).as_ref(), Some(&first));
    let total: i64 = (0..sim.len()).filter(|&i| !sim.is_crashed(i)).map(|i| sim.ownership(i, failed)).sum();
    assert_eq!(total, 1, "net ownership of {failed}");
    // The rule: the smallest live id.
    let smallest = running.iter().filter_map(|&i| sim.id(i)).min().expect("someone runs");
    assert_eq!(first, smallest);
}

#[test]
fn small_cluster_converges_and_detects_a_crash_quickly() {
    let mut sim = Sim::cluster(NetConfig::default(), Timers::default(), 3);
    sim.run_until_converged(5_000).expect("3 nodes converge");
    let victim = sim.id(2).expect("joined");
    sim.run_for(1_000);
    let crash_at = sim.now_ms();
    sim.crash(2);
    sim.run_for(4_000);
    for i in [0, 1] {
        let at = sim.detected_at(i, &victim).expect("detected");
        assert!(at - crash_at <= 3_000, "node {i} detected after {} ms", at - crash_at);
    }
    assert_single_owner(&sim, &victim);
    assert!(sim.converged());
}

#[test]
fn lossy_network_of_20_converges_without_false_positives_then_detects_two_concurrent_crashes() {
    let mut sim = Sim::cluster(lossy(7), Timers::default(), 20);
    sim.run_until_converged(15_000).expect("20 nodes converge under loss");
    sim.run_for(20_000);
    for i in 0..20 {
        let downs = sim.events(i).iter().filter(|l| matches!(l.event, Event::PeerDown { .. })).count();
        assert_eq!(downs, 0, "false positive on node {i}");
    }
    // Crash the two oldest nodes at once: one of them is the natural recovery owner.
    let victims = ids(&sim, &[0, 1]);
    let crash_at = sim.now_ms();
    sim.crash(0);
    sim.crash(1);
    sim.run_for(6_000);
    for i in sim.running() {
        for v in &victims {
            let at = sim.detected_at(i, v).unwrap_or_else(|| panic!("node {i} missed {v}"));
            assert!(at - crash_at <= 3_000, "node {i} detected {v} after {} ms", at - crash_at);
        }
    }
    for v in &victims {
        assert_single_owner(&sim, v);
    }
    assert!(sim.converged());
}

#[test]
fn stalled_node_causes_no_false_positive_among_8_over_60s() {
    let mut sim = Sim::cluster(lossy(11), Timers::default(), 8);
    sim.run_until_converged(10_000).expect("8 nodes converge");
    sim.run_for(10_000);
    sim.stall(3, 1_000);
    sim.run_for(50_000);
    for i in 0..8 {
        let downs: Vec<_> =
            sim.events(i).iter().filter(|l| matches!(l.event, Event::PeerDown { .. })).collect();
        assert!(downs.is_empty(), "false positive on node {i}: {downs:?}");
    }
    assert!(sim.converged());
}

#[test]
fn failure_of_the_recovery_owner_during_the_election_is_resolved() {
    let mut sim = Sim::cluster(lossy(3), Timers::default(), 6);
    sim.run_until_converged(10_000).expect("converge");
    let first = sim.id(3).expect("joined");
    let owner = sim.id(0).expect("joined");
    sim.crash(3);
    // Node 0 (smallest id) would win; it dies while the others detect node 3.
    sim.run_for(2_100);
    sim.crash(0);
    sim.run_for(6_000);
    assert_single_owner(&sim, &first);
    assert_single_owner(&sim, &owner);
    assert!(sim.converged());
}

#[test]
fn partition_heals_and_ownership_converges_to_one() {
    let mut sim = Sim::cluster(lossy(5), Timers::default(), 10);
    sim.run_until_converged(10_000).expect("converge");
    let victim = sim.id(9).expect("joined");
    sim.partition(vec![0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    sim.run_for(1_000);
    sim.crash(9);
    // Both sides detect 9 (and the other side) and each elects an owner.
    sim.run_for(6_000);
    sim.heal();
    let healed = sim.run_until_converged(15_000);
    assert!(healed.is_some(), "healed partition did not converge");
    sim.run_for(3_000);
    assert_single_owner(&sim, &victim);
}

#[test]
fn graceful_leave_is_immediate_and_new_nodes_join_through_anyone() {
    let mut sim = Sim::cluster(lossy(9), Timers::default(), 5);
    sim.run_until_converged(10_000).expect("converge");
    let leaver = sim.id(4).expect("joined");
    let at = sim.now_ms();
    sim.leave(4);
    sim.run_for(400);
    for i in 0..4 {
        let t = sim.detected_at(i, &leaver).expect("leave seen");
        assert!(t - at < 400);
    }
    let late = sim.add_node(Some(2));
    sim.run_until_converged(10_000).expect("late joiner converges");
    sim.run_for(2_000);
    // The newcomer learned about the departed node and its owner from gossip.
    assert!(sim.core(late).failures().iter().any(|f| f.id == leaver));
    assert_single_owner(&sim, &leaver);
}

#[test]
fn fifty_nodes_converge_and_detect_a_crash() {
    let net = NetConfig {
        loss: 0.10,
        duplicate: 0.02,
        min_delay_ms: 1,
        max_delay_ms: 20,
        seed: 13,
        ..NetConfig::default()
    };
    let mut sim = Sim::cluster(net, Timers::default(), 50);
    sim.run_until_converged(20_000).expect("50 nodes converge");
    let victim = sim.id(17).expect("joined");
    let crash_at = sim.now_ms();
    sim.crash(17);
    // Detection times are checked from the event timestamps; the extra time lets the owner's
    // claim reach every node through the lossy gossip.
    sim.run_for(6_000);
    for i in sim.running() {
        let at = sim.detected_at(i, &victim).unwrap_or_else(|| panic!("node {i} missed the crash"));
        assert!(at - crash_at <= 3_000);
    }
    for i in sim.running() {
        let downs = sim.events(i).iter().filter(|l| matches!(l.event, Event::PeerDown { .. })).count();
        assert_eq!(downs, 1, "node {i} reported other failures");
    }
    assert_single_owner(&sim, &victim);
}

#[test]
fn many_seeds_crash_detection_and_single_takeover_without_conflicts() {
    for seed in 100..116 {
        let n = 4 + (seed as usize % 7);
        let mut sim = Sim::cluster(lossy(seed), Timers::default(), n);
        sim.run_until_converged(15_000).unwrap_or_else(|| panic!("seed {seed}: {n} nodes did not converge"));
        sim.run_for(3_000);
        let victims: Vec<usize> = if seed % 2 == 0 { vec![n - 1] } else { vec![0, n / 2] };
        let victim_ids = ids(&sim, &victims);
        let crash_at = sim.now_ms();
        for &v in &victims {
            sim.crash(v);
        }
        sim.run_for(6_000);
        for i in sim.running() {
            let downs: Vec<NodeId> = sim
                .events(i)
                .iter()
                .filter_map(|l| match &l.event {
                    Event::PeerDown { id, .. } => Some(id.clone()),
                    _ => None,
                })
                .collect();
            assert_eq!(downs.len(), victims.len(), "seed {seed}: node {i} saw downs {downs:?}");
            for v in &victim_ids {
                let at = sim.detected_at(i, v).unwrap_or_else(|| panic!("seed {seed}: node {i} missed {v}"));
                assert!(at - crash_at <= 3_000, "seed {seed}: detection after {} ms", at - crash_at);
            }
            let relinquished = sim.events(i).iter().any(|l| matches!(l.event, Event::Relinquish { .. }));
            assert!(!relinquished, "seed {seed}: conflicting takeover without a partition");
        }
        for v in &victim_ids {
            assert_single_owner(&sim, v);
        }
    }
}

// ------------------------------------------------------------------------------------------
// Attacks (issue 9: H3, H4, M1): raw datagrams from an attacker address into the simulation.

use std::net::SocketAddr;

use cdtester::core::MAX_CLAIMS_PER_DATAGRAM;
use cdtester::wire::{Codec, Envelope, HeartbeatData, Message, RecoveryElectionData};

fn attacker(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An unauthenticated datagram from `from` (the envelope claims `from` too).
fn forge(from: SocketAddr, msg: Message) -> Vec<u8> {
    Codec::default().encode(&Envelope::new(from, msg, 1.0)).expect("encodes")
}

fn heartbeat(id: &NodeId) -> HeartbeatData {
    HeartbeatData::bare(id.clone())
}

fn downs_of(sim: &Sim, i: usize, who: &NodeId) -> usize {
    sim.events(i).iter().filter(|l| matches!(&l.event, Event::PeerDown { id, .. } if id == who)).count()
}

#[test]
fn forged_leaves_elections_and_max_counters_evict_no_one_and_block_no_refutation() {
    let mut sim = Sim::cluster(NetConfig::default(), Timers::default(), 4);
    sim.run_until_converged(5_000).expect("converge");
    let victim = sim.id(3).expect("joined");
    let victim_addr = Sim::addr(3);
    let evil = attacker(30_000);
    let evil_id = NodeId("100000000000000000666".into());
    // The attacker joins like anyone may on an open network, and learns every id.
    for i in 0..4 {
        sim.inject(evil, i, forge(evil, Message::Heartbeat(heartbeat(&evil_id))));
    }
    sim.run_for(100);
    for round in 0..20 {
        for i in 0..3 {
            // A leave in the victim's name, with counter 2^64-1.
            let mut leave = heartbeat(&victim);
            leave.leaving = true;
            leave.hb.insert(victim.clone(), u64::MAX);
            sim.inject(evil, i, forge(evil, Message::Heartbeat(leave)));
            // Gossip: the victim's counter at 2^64-1 and failure claims at the limits.
            let mut gossip = heartbeat(&evil_id);
            gossip.hb.insert(evil_id.clone(), 1_800_000_000_000 + round);
            gossip.hb.insert(victim.clone(), u64::MAX);
            gossip.dead.insert(victim.clone(), (u64::MAX, victim_addr.to_string()));
            sim.inject(evil, i, forge(evil, Message::Heartbeat(gossip.clone())));
            gossip.hb.clear();
            gossip.dead.insert(victim.clone(), (sim.unix_ms(), victim_addr.to_string()));
            sim.inject(evil, i, forge(evil, Message::Heartbeat(gossip)));
            // Elections: in the victim's name as candidate, and by the attacker itself.
            for candidate in [&victim, &evil_id] {
                let el = RecoveryElectionData {
                    candidate_id: candidate.clone(),
                    failed_node: victim.clone(),
                    timestamp: 1.0,
                    extra: Default::default(),
                    failed_node_addr: victim_addr.to_string(),
                };
                sim.inject(evil, i, forge(evil, Message::RecoveryElection(el)));
            }
        }
        sim.run_for(100);
    }
    sim.run_for(3_000);
    for i in 0..3 {
        assert_eq!(downs_of(&sim, i, &victim), 0, "node {i} evicted the victim");
        assert!(sim.core(i).peers().any(|(id, _)| *id == victim), "node {i} lost the victim");
        assert!(sim.core(i).counters().rejected > 0, "node {i} counted nothing");
    }
    // The victim can still fail and be detected normally.
    let crash_at = sim.now_ms();
    sim.crash(3);
    sim.run_for(5_000);
    for i in 0..3 {
        let at = sim.detected_at(i, &victim).expect("detected");
        assert!(at - crash_at <= 3_000);
    }
    assert_single_owner(&sim, &victim);
}

#[test]
fn a_max_counter_claim_about_a_dead_node_does_not_block_its_refutation() {
    // The victim is partitioned away (declared failed), the attacker poisons its tombstone with
    // 2^64-1, the partition heals: the victim's own heartbeats re-admit it.
    let mut sim = Sim::cluster(NetConfig::default(), Timers::default(), 4);
    sim.run_until_converged(5_000).expect("converge");
    let victim = sim.id(3).expect("joined");
    let evil = attacker(30_001);
    let evil_id = NodeId("100000000000000000667".into());
    sim.partition(vec![0, 0, 0, 1]);
    sim.run_for(4_000);
    assert!(sim.detected_at(0, &victim).is_some());
    for i in 0..3 {
        let mut gossip = heartbeat(&evil_id);
        gossip.dead.insert(victim.clone(), (u64::MAX, Sim::addr(3).to_string()));
        gossip.dead.insert(victim.clone(), (u64::MAX - 1, Sim::addr(3).to_string()));
        gossip.hb.insert(victim.clone(), u64::MAX);
        sim.inject(evil, i, forge(evil, Message::Heartbeat(gossip)));
    }
    sim.run_for(100);
    sim.heal();
    // Probes of the (observed) tombstone every 4th heartbeat merge the sides again.
    sim.run_until_converged(15_000).expect("the victim refutes and is re-admitted");
}

#[test]
fn a_claim_flood_naming_a_victim_address_makes_the_nodes_send_almost_nothing_there() {
    let mut sim = Sim::cluster(NetConfig::default(), Timers::default(), 4);
    sim.run_until_converged(5_000).expect("converge");
    let legit = ids(&sim, &[0, 1, 2, 3]);
    let evil = attacker(30_002);
    let evil_id = NodeId("100000000000000000668".into());
    let victim = attacker(31_000);
    let mut bytes_in = 0u64;
    // 10 s of 27 KB-class datagrams: 600 fake peers and 600 failure claims, all at the victim
    // port (and a few neighbouring ports), plus elections pointing there.
    for round in 0..100u64 {
        let mut hb = heartbeat(&evil_id);
        hb.hb.insert(evil_id.clone(), 1_800_000_000_000 + round);
        for k in 0..600u64 {
            let fake = NodeId(format!("{}", 200_000_000_000_000_000_000u128 + u128::from(round * 1000 + k)));
            let port = 31_000 + (k % 4) as u16;
            hb.peers.insert(fake.clone(), ("127.0.0.1".into(), port));
            let dead = NodeId(format!("{}", 300_000_000_000_000_000_000u128 + u128::from(round * 1000 + k)));
            hb.dead.insert(dead, (1, format!("127.0.0.1:{port}")));
        }
        let el = RecoveryElectionData {
            candidate_id: evil_id.clone(),
            failed_node: NodeId(format!("{}", 400_000_000_000_000_000_000u128 + u128::from(round))),
            timestamp: 1.0,
            extra: Default::default(),
            failed_node_addr: victim.to_string(),
        };
        for i in 0..4 {
            let d = forge(evil, Message::Heartbeat(hb.clone()));
            bytes_in += d.len() as u64;
            sim.inject(evil, i, d);
            sim.inject(evil, i, forge(evil, Message::RecoveryElection(el.clone())));
        }
        sim.run_for(100);
    }
    let (datagrams, bytes) = (0..4u16).fold((0, 0), |acc, k| {
        let (d, b) = sim.stray(attacker(31_000 + k));
        (acc.0 + d, acc.1 + b)
    });
    eprintln!("attacker sent {bytes_in} bytes; the victim ports got {datagrams} datagrams, {bytes} bytes");
    // Each node probes each unconfirmed address at most once per 8 heartbeats (4 s): 4 nodes
    // x 4 ports x 3 probes of a slim heartbeat over 10 s.
    assert!(bytes <= 4 * 4 * 3 * 400, "amplification: {bytes} bytes to the victim");
    assert!(bytes * 100 < bytes_in, "no amplification: {bytes} out for {bytes_in} in");
    // Caps were hit, and the real members are unaffected.
    for i in 0..4 {
        assert!(sim.core(i).counters().rejected > 0);
        for id in &legit {
            assert_eq!(downs_of(&sim, i, id), 0, "node {i} lost {id}");
        }
        assert!(
            sim.core(i).failures().len() <= 2 * MAX_CLAIMS_PER_DATAGRAM * 10,
            "failure records are capped"
        );
    }
}

#[test]
fn with_a_secret_replayed_datagrams_of_a_crashed_node_keep_nothing_alive() {
    let net = NetConfig { codec: Codec::new(Some("cluster secret")).expect("codec"), ..lossy(21) };
    let mut sim = Sim::cluster(net, Timers::default(), 5);
    sim.run_until_converged(10_000).expect("authenticated cluster converges");
    sim.record();
    sim.run_for(3_000);
    let victim = sim.id(4).expect("joined");
    let from_victim: Vec<_> = sim.captured().iter().filter(|c| c.from == Sim::addr(4)).cloned().collect();
    assert!(from_victim.len() > 20);
    // A replay while everyone is alive is refused and counted (sent twice: the original may
    // have been lost, then the first copy is its delivery).
    let one = sim.captured().iter().find(|c| c.from == Sim::addr(1)).cloned().expect("captured");
    let dest = sim.node_at(one.to).expect("a node");
    let before = sim.channel_stats(dest).replayed;
    sim.inject(one.from, dest, one.bytes.clone());
    sim.inject(one.from, dest, one.bytes.clone());
    sim.run_for(50);
    assert!(sim.channel_stats(dest).replayed > before);
    // The victim dies; an attacker at its address replays everything it ever sent, again and
    // again, and also sends each captured datagram to every other node.
    let crash_at = sim.now_ms();
    sim.crash(4);
    for _ in 0..50 {
        for c in &from_victim {
            for i in 0..4 {
                sim.inject(c.from, i, c.bytes.clone());
            }
        }
        sim.run_for(100);
    }
    for i in 0..4 {
        let at = sim.detected_at(i, &victim).expect("detected despite the replays");
        assert!(at - crash_at <= 3_000, "node {i} detected after {} ms", at - crash_at);
        assert_eq!(downs_of(&sim, i, &victim), 1, "a replay revived the victim on node {i}");
        let s = sim.channel_stats(i);
        assert!(s.replayed + s.misdirected > 0, "node {i}: {s:?}");
    }
    assert_single_owner(&sim, &victim);
    // An outsider without the secret is not heard at all.
    let evil = attacker(30_003);
    let mut leave = heartbeat(&sim.id(0).expect("id"));
    leave.leaving = true;
    for i in 1..4 {
        sim.inject(evil, i, forge(evil, Message::Heartbeat(leave.clone())));
    }
    sim.run_for(500);
    for i in 1..4 {
        assert!(sim.channel_stats(i).unauthenticated > 0);
    }
    assert!(sim.converged());
}
