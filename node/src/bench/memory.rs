//! `cdtester bench memory`: memory and processes of a node after many evaluations. One real node
//! process (2 worker slots, `node.release_after_s = 2`) evaluates N small projects one
//! evaluation after another, each with new content (so each is prepared anew: a warm pytest
//! server and an extracted tree). Printed: the resident memory (RSS) and process count of the
//! node and its descendants at start, idle after one warm-up evaluation, at the peak, and after
//! the last one once the release grace has passed, with the after/idle ratio (target: within
//! 10%).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdtester_config::Config;

use crate::client::Client;
use crate::demo::LocalCluster;

/// Options of `cdtester bench memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Evaluations to run one after another.
    #[arg(long, default_value_t = 50)]
    pub evaluations: usize,
}

/// RSS (KiB) and process count of `pid` and all its descendants, from /proc.
pub fn tree_usage(pid: u32) -> (u64, usize) {
    let members = tree_processes(pid);
    (members.iter().map(|(_, rss)| rss).sum(), members.len())
}

/// `pid` and all its descendants with their RSS (KiB), from /proc.
pub fn tree_processes(pid: u32) -> Vec<(u32, u64)> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    let mut rss: HashMap<u32, u64> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for e in dir.filter_map(Result::ok) {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        if let Some(pp) = field("PPid:") {
            parent.insert(p, pp as u32);
        }
        rss.insert(p, field("VmRSS:").unwrap_or(0));
    }
    let in_tree = |mut p: u32| {
        while p > 1 {
            if p == pid {
                return true;
            }
            p = parent.get(&p).copied().unwrap_or(0);
        }
        false
    };
    parent.keys().copied().filter(|p| in_tree(*p)).map(|p| (p, rss.get(&p).copied().unwrap_or(0))).collect()
}

/// A small project whose content differs with `i`.
fn project_zip(i: usize) -> anyhow::Result<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for m in 0..2 {
        w.start_file(format!("p{i}/tests/test_m{m}.py"), opts).context("zip entry")?;
        let body = format!(
            "# evaluation {i}\ndef test_a():\n    assert {i} + {m} >= 0\n\ndef test_b():\n    assert 1\n"
        );
        std::io::Write::write_all(&mut w, body.as_bytes()).context("zip write")?;
    }
    Ok(w.finish().context("zip finish")?.into_inner())
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(measure(args, config))
}

async fn measure(args: Args, config: &Config) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let exe = std::env::current_exe().context("locating the cdtester binary")?;
    let venvs = config.runner.local.venv_dir.clone().unwrap_or_else(crate::demo::shared_venv_dir);
    let env = vec![
        ("CDT_RUNNER__LOCAL__VENV_DIR".to_string(), venvs.to_string_lossy().into_owned()),
        ("CDT_NODE__RELEASE_AFTER_S".to_string(), "2".to_string()),
        ("CDT_RUNNER__WORKERS".to_string(), "2".to_string()),
        ("CDT_LOG".to_string(), "warn".to_string()),
    ];
    let mut cluster = LocalCluster::new(exe, dir.path().to_path_buf(), env);
    cluster.start(1)?;
    cluster.wait_mesh(Duration::from_secs(30)).await?;
    let pid = cluster.nodes[0].pid().context("node pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fresh = tree_usage(pid);
    let client = Client::new(cluster.nodes[0].http);
    // One evaluation warms the node up (interpreter lookup, store pages, connection pools);
    // idle is measured once it has been released.
    evaluate(&client, pid, usize::MAX, &mut (0, 0)).await?;
    tokio::time::sleep(SETTLE).await;
    let idle = tree_usage(pid);
    let mut peak = idle;
    let started = Instant::now();
    for i in 0..args.evaluations {
        evaluate(&client, pid, i, &mut peak).await?;
    }
    let wall = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let after = tree_usage(pid);
    cluster.shutdown();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("memory of one node and its processes, {} evaluations in {wall:.1} s", args.evaluations);
    println!("  fresh start:   {:8.1} MiB in {:3} processes", mib(fresh.0), fresh.1);
    println!("  idle (warm):   {:8.1} MiB in {:3} processes", mib(idle.0), idle.1);
    println!("  peak:          {:8.1} MiB in {:3} processes", mib(peak.0), peak.1);
    println!("  idle after:    {:8.1} MiB in {:3} processes", mib(after.0), after.1);
    println!("  after / idle:  {:.2}x (target: at most 1.10x)", after.0 as f64 / idle.0.max(1) as f64);
    Ok(())
}

/// The release grace (2 s) plus the collector's period and a margin.
const SETTLE: Duration = Duration::from_secs(8);

/// Submits project `i` and waits for its 4 passing tests, tracking the peak usage.
async fn evaluate(client: &Client, pid: u32, i: usize, peak: &mut (u64, usize)) -> anyhow::Result<()> {
    let id = client.submit_zip(project_zip(i)?, "p.zip").await?;
    loop {
        let usage = tree_usage(pid);
        *peak = (peak.0.max(usage.0), peak.1.max(usage.1));
        let r = client.progress(id).await?;
        if r.status == crate::eval::EvalStatus::Finished {
            if r.summary.total_passed != 4 {
                bail!("evaluation {i} did not pass its 4 tests: {:?}", r.summary);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
