//! `cdtester bench auth`: the cost of datagram authentication. Encodes and decodes the same
//! HEARTBEAT (full gossip tables of `--peers` members) through a sender's and a receiver's
//! [`Channel`], once without a secret (the reference's wire format) and once with one (seal,
//! HMAC-SHA256 and replay check), in the same run, and prints datagrams/s and the ratio.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;

use crate::wire::{Channel, Envelope, HeartbeatData, Message, NodeId};

/// Options of `cdtester bench auth`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Datagrams per measurement.
    #[arg(long, default_value_t = 200_000)]
    pub count: u64,
    /// Members in the heartbeat's gossip tables (sets the datagram size).
    #[arg(long, default_value_t = 10)]
    pub peers: u16,
}

fn heartbeat(peers: u16) -> Message {
    let ids: Vec<NodeId> =
        (0..peers).map(|i| NodeId::mint(1_795_512_038_648_868 + u64::from(i), 12_345)).collect();
    Message::Heartbeat(HeartbeatData {
        id: ids.first().cloned().unwrap_or_else(|| NodeId::mint(1, 10_000)),
        peers: ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), ("10.0.0.1".to_string(), 8_000 + i as u16)))
            .collect(),
        hb: ids.iter().map(|id| (id.clone(), 1_795_512_038_648)).collect(),
        dead: BTreeMap::new(),
        owners: BTreeMap::new(),
        leaving: false,
        http: Some("10.0.0.1:5000".into()),
    })
}

/// Encode+decode `count` datagrams; returns (datagrams/s, datagram bytes).
fn measure(secret: Option<&str>, msg: &Message, count: u64) -> anyhow::Result<(f64, usize)> {
    let (a, b): (SocketAddr, SocketAddr) = (([10, 0, 0, 1], 8000).into(), ([10, 0, 0, 2], 8000).into());
    let mut tx = Channel::new(secret, a, 1)?;
    let mut rx = Channel::new(secret, b, 2)?;
    let now_ms = 1_795_512_038_648;
    let mut size = 0;
    let start = Instant::now();
    for _ in 0..count {
        let bytes = tx.seal(Envelope::new(a, msg.clone(), 1.0), b, now_ms)?;
        size = bytes.len();
        rx.open(&bytes, a, now_ms).context("the receiver refused a fresh datagram")?;
    }
    Ok((count as f64 / start.elapsed().as_secs_f64(), size))
}

/// Run the benchmark and print one line per mode plus the ratio.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let msg = heartbeat(args.peers);
    // Warm up caches and the allocator for both modes.
    measure(None, &msg, args.count / 10 + 1)?;
    measure(Some("warm-up"), &msg, args.count / 10 + 1)?;
    let (open, open_size) = measure(None, &msg, args.count)?;
    let (auth, auth_size) = measure(Some("benchmark secret"), &msg, args.count)?;
    println!("datagram authentication (HEARTBEAT with {} peers, encode + decode, one core):", args.peers);
    println!("  without MAC: {open:>12.0} datagrams/s  ({open_size} bytes each)");
    println!(
        "  with MAC:    {auth:>12.0} datagrams/s  ({auth_size} bytes each: seal + HMAC-SHA256 + replay check)"
    );
    println!("  ratio:       {:>12.2}x slower with authentication", open / auth);
    Ok(())
}
