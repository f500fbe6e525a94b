//! `cdtester bench membership`: failure-detection latency and protocol load of the membership
//! layer. By default it is measured on the deterministic simulator ([`crate::core::sim`]) that
//! drives the real protocol core with simulated time (1-5 ms delivery delay, optional loss), so
//! cluster sizes up to 50 run in seconds on one machine. With `--real` every node is a real UDP
//! shell ([`crate::udp`]) on 127.0.0.1 in this process (one tokio thread), with real timers;
//! the crash is the abrupt end of one node's loop and socket.
//!
//! Per cluster size and run: form the cluster, wait until every node sees every other, measure
//! the datagrams (and bytes) each node sends per second over 10 s of steady state, crash one
//! node, then measure when the first survivor and when the last survivor declared it failed,
//! and when its recovery owner took over.

use anyhow::{Context, bail};
use cdtester_config::Timers;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::core::Event;
use crate::core::sim::{NetConfig, Sim};
use crate::udp::{self, Running, ShellConfig};

/// Options of `cdtester bench membership`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Cluster sizes.
    #[arg(long, value_delimiter = ',', default_value = "3,10,50")]
    pub sizes: Vec<usize>,
    /// Crashes measured per size (each in a fresh cluster with its own seed).
    #[arg(long, default_value_t = 5)]
    pub runs: u64,
    /// Datagram loss probability (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Base seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Real UDP sockets on 127.0.0.1 and real time instead of the simulator (`--loss` does
    /// not apply).
    #[arg(long)]
    pub real: bool,
}

/// Measurements of one run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    msgs_per_node_s: f64,
    bytes_per_node_s: Option<f64>,
    first_ms: u64,
    all_ms: u64,
    takeover_ms: u64,
}

fn one_run(n: usize, timers: &Timers, loss: f64, seed: u64, bytes: bool) -> anyhow::Result<Sample> {
    let net =
        NetConfig { loss, duplicate: 0.0, min_delay_ms: 1, max_delay_ms: 5, seed, ..NetConfig::default() };
    let mut sim = Sim::cluster(net, timers.clone(), n);
    sim.run_until_converged(60_000).with_context(|| format!("{n} nodes did not converge"))?;
    sim.run_for(2_000);
    if bytes {
        sim.measure_bytes();
    }
    let sent0 = sim.sent_total();
    const WINDOW_MS: u64 = 10_000;
    sim.run_for(WINDOW_MS);
    let secs = WINDOW_MS as f64 / 1000.0;
    let msgs_per_node_s = (sim.sent_total() - sent0) as f64 / n as f64 / secs;
    let bytes_per_node_s = sim.bytes_sent().map(|b| b as f64 / n as f64 / secs);

    let victim_idx = n / 2;
    let victim = sim.id(victim_idx).context("victim has an id")?;
    let t0 = sim.now_ms();
    sim.crash(victim_idx);
    let survivors: Vec<usize> = sim.running();
    let mut waited = 0;
    while survivors.iter().any(|&i| sim.detected_at(i, &victim).is_none())
        || takeover_at(&sim, &victim).is_none()
    {
        if waited > 30_000 {
            bail!("crash of a node among {n} not detected within 30 s");
        }
        sim.run_for(50);
        waited += 50;
    }
    let times: Vec<u64> =
        survivors.iter().filter_map(|&i| sim.detected_at(i, &victim)).map(|t| t - t0).collect();
    Ok(Sample {
        msgs_per_node_s,
        bytes_per_node_s,
        first_ms: times.iter().copied().min().unwrap_or(0),
        all_ms: times.iter().copied().max().unwrap_or(0),
        takeover_ms: takeover_at(&sim, &victim).unwrap_or(t0) - t0,
    })
}

/// One crash measured with real sockets.
async fn real_run(n: usize, timers: &Timers) -> anyhow::Result<Sample> {
    let mut nodes: Vec<Running> = Vec::new();
    for i in 0..n {
        let join = (i > 0).then(|| nodes[(i - 1) / 2].local_addr);
        let cfg = ShellConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            join,
            http: None,
            timers: timers.clone(),
            secret: None,
        };
        let mut running = udp::start(cfg).await?;
        // Nobody consumes the events here; drain them.
        let mut events = std::mem::replace(&mut running.events, tokio::sync::mpsc::unbounded_channel().1);
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        nodes.push(running);
    }
    let result = measure_real(&nodes, n).await;
    for node in &nodes {
        node.task.abort();
    }
    result
}

async fn measure_real(nodes: &[Running], n: usize) -> anyhow::Result<Sample> {
    let start = Instant::now();
    while nodes.iter().any(|r| r.handle.snapshot().peers.len() != n - 1) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("{n} real nodes did not converge within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<_> = nodes.iter().map(|r| r.handle.traffic()).collect();
    const WINDOW: Duration = Duration::from_secs(10);
    tokio::time::sleep(WINDOW).await;
    let after: Vec<_> = nodes.iter().map(|r| r.handle.traffic()).collect();
    let secs = WINDOW.as_secs_f64();
    let sent: u64 = after.iter().zip(&before).map(|(a, b)| a.sent - b.sent).sum();
    let bytes: u64 = after.iter().zip(&before).map(|(a, b)| a.sent_bytes - b.sent_bytes).sum();

    if nodes.iter().any(|r| r.handle.snapshot().peers.len() != n - 1) {
        bail!(
            "the {n} real nodes lost members before the crash (false positives: is the CPU saturated? use a release build)"
        );
    }
    let victim = n / 2;
    let victim_addr = nodes[victim].local_addr.to_string();
    nodes[victim].task.abort();
    let t0 = Instant::now();
    let mut detected: Vec<Option<u64>> = vec![None; n];
    detected[victim] = Some(0);
    let mut takeover = None;
    while detected.iter().any(Option::is_none) || takeover.is_none() {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("crash of a node among {n} not detected within 30 s");
        }
        let ms = t0.elapsed().as_millis() as u64;
        for (i, r) in nodes.iter().enumerate() {
            if i == victim {
                continue;
            }
            let snap = r.handle.snapshot();
            if detected[i].is_none() && !snap.peers.values().any(|a| *a == victim_addr) {
                detected[i] = Some(ms);
            }
            let owns =
                snap.failed.iter().any(|f| f.addr == victim_addr && f.owner.is_some() && f.owner == snap.id);
            if takeover.is_none() && owns {
                takeover = Some(ms);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let times: Vec<u64> =
        detected.iter().enumerate().filter(|(i, _)| *i != victim).filter_map(|(_, t)| *t).collect();
    Ok(Sample {
        msgs_per_node_s: sent as f64 / n as f64 / secs,
        bytes_per_node_s: Some(bytes as f64 / n as f64 / secs),
        first_ms: times.iter().copied().min().unwrap_or(0),
        all_ms: times.iter().copied().max().unwrap_or(0),
        takeover_ms: takeover.unwrap_or(0),
    })
}

fn takeover_at(sim: &Sim, failed: &crate::wire::NodeId) -> Option<u64> {
    sim.running()
        .into_iter()
        .flat_map(|i| sim.events(i).iter())
        .filter_map(|l| match &l.event {
            Event::TakeOver { failed_id, .. } if failed_id == failed => Some(l.at_ms),
            _ => None,
        })
        .min()
}

fn mean_max(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = v.clone().count().max(1) as f64;
    (v.clone().sum::<f64>() / n, v.fold(0.0, f64::max))
}

/// Run the benchmark and print a table.
pub fn run(args: &Args, timers: &Timers) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&args.loss) {
        bail!("--loss must be in [0, 1)");
    }
    let mode = if args.real {
        "real UDP sockets on 127.0.0.1, one process".to_string()
    } else {
        format!("simulation of the protocol core: 1-5 ms delays, {:.0}% loss", args.loss * 100.0)
    };
    println!(
        "membership benchmark ({mode}; heartbeat {} ms, failure timeout {} ms, election settle {} ms)",
        timers.heartbeat_ms, timers.failure_timeout_ms, timers.election_timeout_ms
    );
    let runtime = match args.real {
        true => Some(
            tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?,
        ),
        false => None,
    };
    println!(
        "{:>6} {:>5} {:>14} {:>14} {:>20} {:>20} {:>20}",
        "nodes", "runs", "msgs/s/node", "KiB/s/node", "first detect ms", "all detect ms", "takeover ms"
    );
    println!(
        "{:>6} {:>5} {:>14} {:>14} {:>20} {:>20} {:>20}",
        "", "", "(sent)", "(sent)", "mean / max", "mean / max", "mean / max"
    );
    for &n in &args.sizes {
        if n < 2 {
            bail!("cluster sizes must be at least 2");
        }
        let mut samples = Vec::new();
        for r in 0..args.runs {
            // The simulated nodes' own log lines would drown the table.
            let sample =
                tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                    match &runtime {
                        Some(rt) => rt.block_on(real_run(n, timers)),
                        None => one_run(n, timers, args.loss, args.seed.wrapping_add(r), r == 0),
                    }
                })?;
            samples.push(sample);
        }
        let (msgs, _) = mean_max(samples.iter().map(|s| s.msgs_per_node_s));
        let kib = samples.iter().find_map(|s| s.bytes_per_node_s).map(|b| b / 1024.0).unwrap_or(f64::NAN);
        let (f_mean, f_max) = mean_max(samples.iter().map(|s| s.first_ms as f64));
        let (a_mean, a_max) = mean_max(samples.iter().map(|s| s.all_ms as f64));
        let (t_mean, t_max) = mean_max(samples.iter().map(|s| s.takeover_ms as f64));
        println!(
            "{n:>6} {:>5} {msgs:>14.1} {kib:>14.1} {:>20} {:>20} {:>20}",
            samples.len(),
            format!("{f_mean:.0} / {f_max:.0}"),
            format!("{a_mean:.0} / {a_max:.0}"),
            format!("{t_mean:.0} / {t_max:.0}"),
        );
    }
    Ok(())
}
