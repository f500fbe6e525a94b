//! `cdtester bench latency`: how soon a warm node starts, and finishes, a small submission.
//!
//! One node process on 127.0.0.1. The submission is a zip of one project with one test that
//! fails with the wall-clock time at which it started (`time.time()` in the test itself, the
//! same clock as this process's), so the report carries the moment the first test began. After
//! untimed warm-up submissions (environment, zygote and prepared project made), each round
//! posts the zip and polls the evaluation every 5 ms until it is finished: submission to first
//! test start (from the test's clock) and submission to finished as seen by the client (polling
//! granularity included), p50 / p95 / max over the rounds. Target: first test start at most
//! 200 ms after the POST on a warm node.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use cdtester_config::Config;

use crate::client::Client;
use crate::demo::LocalCluster;
use crate::eval::EvalStatus;

/// Options of `cdtester bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Timed submissions.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Untimed submissions first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

const TEST: &str = "import time\n\n\ndef test_started():\n    assert False, \"started %.6f\" % time.time()\n";

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One submission: (seconds to the first test's start, seconds to finished as polled).
async fn submit_once(client: &Client, zip: &[u8]) -> anyhow::Result<(f64, f64)> {
    let (posted, clock) = (Instant::now(), now_secs());
    let id = client.submit_zip(zip.to_vec(), "latency.zip").await?;
    loop {
        let r = client.progress(id).await?;
        if r.status == EvalStatus::Finished {
            break;
        }
        if posted.elapsed() > Duration::from_secs(120) {
            bail!("evaluation {id} did not finish within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = posted.elapsed().as_secs_f64();
    let report = client.report(id).await?;
    let message = report
        .projects
        .values()
        .flat_map(|p| p.modules.values())
        .flat_map(|m| m.tests.iter().flatten())
        .find_map(|t| t.message.clone())
        .context("the test reported no message")?;
    let started: f64 = message
        .split("started ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no start time in {message:?}"))?;
    Ok((started - clock, done))
}

/// p50, p95 and max of `v` (sorted here).
fn quantiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (super::percentile(v, 0.5), super::percentile(v, 0.95), super::percentile(v, 1.0))
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let work = tempfile::Builder::new().prefix("cdtester-bench-latency-").tempdir()?;
    let project = work.path().join("p");
    std::fs::create_dir_all(project.join("tests"))?;
    std::fs::write(project.join("tests/test_latency.py"), TEST)?;
    let zip = crate::fetch::pack_projects(&[("p".to_string(), project)])?;
    let venvs = config.runner.local.venv_dir.clone().unwrap_or_else(crate::demo::shared_venv_dir);
    let env = vec![("CDT_RUNNER__LOCAL__VENV_DIR".to_string(), venvs.to_string_lossy().into_owned())];
    let exe = std::env::current_exe().context("locating the cdtester binary")?;
    let mut cluster = LocalCluster::new(exe, work.path().join("node"), env);
    cluster.start(1)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let measured = rt.block_on(async {
        cluster.wait_mesh(Duration::from_secs(30)).await?;
        let client = Client::new(cluster.nodes[0].http);
        for _ in 0..args.warmup {
            submit_once(&client, &zip).await?;
        }
        let mut rounds = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            rounds.push(submit_once(&client, &zip).await?);
        }
        anyhow::Ok(rounds)
    });
    cluster.shutdown();
    let (mut start, mut done): (Vec<f64>, Vec<f64>) = measured?.into_iter().unzip();
    let ms = |s: f64| s * 1000.0;
    let (s50, s95, smax) = quantiles(&mut start);
    let (d50, d95, dmax) = quantiles(&mut done);
    println!("latency of a one-test submission on a warm node, {} rounds:", args.rounds);
    println!(
        "  POST to first test start:  p50 {:6.1} ms  p95 {:6.1} ms  max {:6.1} ms  (target: at most 200 ms)",
        ms(s50),
        ms(s95),
        ms(smax)
    );
    println!(
        "  POST to finished (polled): p50 {:6.1} ms  p95 {:6.1} ms  max {:6.1} ms",
        ms(d50),
        ms(d95),
        ms(dmax)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_rounds() {
        let mut v = vec![0.3, 0.1, 0.2, 0.5, 0.4];
        assert_eq!(quantiles(&mut v), (0.3, 0.5, 0.5));
        assert_eq!(quantiles(&mut [0.25]), (0.25, 0.25, 0.25));
    }
}
