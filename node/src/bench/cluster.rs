//! `cdtester bench cluster`: the corpus evaluated by a network of 1, 2 and 3 real node processes
//! on 127.0.0.1 (one worker slot each), against plain sequential pytest and `pytest -n 2`
//! (pytest-xdist), in one run: wall time, ratios, time to the first module result, and how many
//! modules give exactly the corpus manifest's run-alone counts.
//!
//! Untimed preparation: fetch and unpack the sdists; build the baseline environments (pytest,
//! pytest-xdist and each project's test requirements); one untimed evaluation on a 1-node network,
//! which builds the nodes' environments (shared by every node) and fills the submitting node's
//! duration memory used for longest-first scheduling. Then the timed runs, in this order:
//! sequential pytest, xdist, and the 1-, 2- and 3-node networks. A network's time runs from the
//! submission (zip upload of all projects) to the evaluation's completion as seen by polling.
//! All nodes share this machine's cores, so more nodes mean more parallel pytest processes, not
//! more CPU.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdtester_config::Config;
use cdtester_runners::local::resolve_python;

use super::CorpusArgs;
use super::local::{baseline_project, time_pytest};
use crate::client::Client;
use crate::corpus::{self, CorpusProject, ExpectedCounts};
use crate::demo::LocalCluster;
use crate::registry;

/// Options of `cdtester bench cluster`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Network sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub sizes: Vec<usize>,
    /// Worker slots per node.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// One timed evaluation on a network.
struct NetRun {
    nodes: usize,
    wall: f64,
    first_result: f64,
    matches: usize,
}

/// `[[projects]]` rules as TOML (test requirements of the corpus projects).
pub(crate) fn rules_toml(projects: &[CorpusProject]) -> String {
    let mut s = String::new();
    for rule in corpus::requirement_rules(projects) {
        let reqs: Vec<String> =
            rule.requirements.iter().map(|r| serde_json::Value::from(r.as_str()).to_string()).collect();
        s.push_str(&format!(
            "[[projects]]\npattern = {}\nrequirements = [{}]\n\n",
            serde_json::Value::from(rule.pattern.as_str()),
            reqs.join(", ")
        ));
    }
    s
}

/// Submits every project as one zip to the network's first node and waits for the result.
async fn evaluate_on(
    cluster: &LocalCluster,
    zip: &[u8],
    expected: &[(String, CorpusProject)],
) -> anyhow::Result<NetRun> {
    let client = Client::new(cluster.nodes[0].http);
    let started = Instant::now();
    let id = client.submit_zip(zip.to_vec(), "corpus.zip").await?;
    let mut first_result = None;
    let report = loop {
        let r = client.progress(id).await?;
        if first_result.is_none() && r.summary.executed > 0 {
            first_result = Some(started.elapsed().as_secs_f64());
        }
        if r.status == crate::eval::EvalStatus::Finished {
            break client.report(id).await?;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("evaluation {id} did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let wall = started.elapsed().as_secs_f64();
    let mut matches = 0;
    for (name, p) in expected {
        let alone = p.expected_alone();
        let Some(p) = report.projects.get(name) else {
            eprintln!("   {name}: not in the report");
            continue;
        };
        for (m, v) in &p.modules {
            let got = ExpectedCounts::of(&v.counts);
            match alone.get(m) {
                Some(want) if *want == got => matches += 1,
                want => eprintln!("   {name} {m}: counted {got:?}, alone {want:?}"),
            }
        }
    }
    Ok(NetRun { nodes: cluster.nodes.len(), wall, first_result: first_result.unwrap_or(wall), matches })
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    if args.workers == 0 || args.sizes.contains(&0) {
        bail!("--workers and --sizes must be at least 1");
    }
    let projects: Vec<CorpusProject> = args.corpus.projects(None)?;
    let cache = args.corpus.cache_dir(config);
    let python = resolve_python(config.runner.local.python.as_deref())?;
    let work = tempfile::Builder::new().prefix("cdtester-bench-cluster-").tempdir()?;
    let src = work.path().join("src");
    let mut base_config = config.clone();
    base_config.projects = corpus::requirement_rules(&projects);
    let baseline = registry::local_runner(&base_config)?;

    // Preparation and baselines.
    let (mut seq, mut xdist, mut xdist_ok) = (0.0, 0.0, true);
    let mut roots = Vec::new();
    let mut expected = Vec::new();
    for p in &projects {
        eprintln!("== {} {}: preparing and timing the pytest baselines", p.name, p.version);
        let (root, base_python) = baseline_project(p, &baseline, &python, &cache, &src)?;
        let (s, _) = time_pytest(&base_python, &root, &[])?;
        let (x, code) = time_pytest(&base_python, &root, &["-n", "2"])?;
        eprintln!("   sequential {s:.2} s, xdist -n 2 {x:.2} s (exit {code})");
        seq += s;
        xdist += x;
        xdist_ok &= code == 0 || code == 1;
        roots.push((p.project_root.clone(), root));
        expected.push((p.project_root.clone(), p.clone()));
    }
    let zip = crate::fetch::pack_projects(&roots)?;
    let modules: usize = projects.iter().map(|p| p.expected_alone().len()).sum();

    // Networks.
    let config_file = work.path().join("cdtester.toml");
    std::fs::write(&config_file, rules_toml(&projects)).context("writing the nodes' configuration")?;
    let venvs = config.runner.local.venv_dir.clone().unwrap_or_else(crate::demo::shared_venv_dir);
    let env = vec![
        ("CDT_CONFIG".to_string(), config_file.to_string_lossy().into_owned()),
        ("CDT_RUNNER__LOCAL__VENV_DIR".to_string(), venvs.to_string_lossy().into_owned()),
        ("CDT_RUNNER__WORKERS".to_string(), args.workers.to_string()),
        ("CDT_LOG".to_string(), "warn".to_string()),
    ];
    let exe = std::env::current_exe().context("locating the cdtester binary")?;
    let nodes_dir = work.path().join("nodes");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let mut runs = Vec::new();
    runtime.block_on(async {
        eprintln!("== warm-up evaluation on 1 node (untimed: environments, duration memory)");
        let mut warm = LocalCluster::new(exe.clone(), nodes_dir.clone(), env.clone());
        warm.start(1)?;
        warm.wait_mesh(Duration::from_secs(30)).await?;
        evaluate_on(&warm, &zip, &expected).await?;
        warm.shutdown();
        for &n in &args.sizes {
            let mut cluster = LocalCluster::new(exe.clone(), nodes_dir.clone(), env.clone());
            cluster.start(n)?;
            cluster.wait_mesh(Duration::from_secs(30)).await?;
            let run = evaluate_on(&cluster, &zip, &expected).await;
            cluster.shutdown();
            let run = run?;
            eprintln!("   {n} node(s): {:.2} s, first result after {:.2} s", run.wall, run.first_result);
            runs.push(run);
        }
        anyhow::Ok(())
    })?;
    print!("{}", render(&runs, seq, xdist, xdist_ok, modules, projects.len(), args.workers));
    Ok(())
}

fn render(
    runs: &[NetRun],
    seq: f64,
    xdist: f64,
    xdist_ok: bool,
    modules: usize,
    projects: usize,
    workers: usize,
) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "corpus: {projects} projects, {modules} modules; {workers} worker slot(s) per node");
    let _ = writeln!(s, "plain pytest (sequential, per project, summed): {seq:.2} s");
    let _ = writeln!(
        s,
        "pytest-xdist -n 2 (summed): {xdist:.2} s{}",
        if xdist_ok { "" } else { " (some runs failed)" }
    );
    let _ = writeln!(
        s,
        "{:<8} {:>9} {:>9} {:>10} {:>17} {:>10}",
        "nodes", "wall s", "vs seq", "vs xdist", "first result s", "modules="
    );
    for r in runs {
        let _ = writeln!(
            s,
            "{:<8} {:>9.2} {:>8.2}x {:>9.2}x {:>17.2} {:>6}/{}",
            r.nodes,
            r.wall,
            r.wall / seq.max(f64::EPSILON),
            r.wall / xdist.max(f64::EPSILON),
            r.first_result,
            r.matches,
            modules
        );
    }
    let _ = writeln!(
        s,
        "(ratios: cdtester time / baseline time, lower is better; modules= = modules whose counts equal the manifest's run-alone counts)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_become_valid_toml_for_the_nodes() {
        let projects = corpus::shipped().unwrap();
        let text = rules_toml(&projects);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let cfg = Config::load(Some(&path)).unwrap();
        assert!(
            cfg.projects
                .iter()
                .any(|r| r.pattern == "attrs-26.1.0" && r.requirements == ["hypothesis==6.170.15"])
        );
    }

    #[test]
    fn table_shows_ratios() {
        let runs = [NetRun { nodes: 2, wall: 10.0, first_result: 0.5, matches: 7 }];
        let out = render(&runs, 20.0, 8.0, true, 7, 2, 1);
        assert!(out.contains("0.50x") && out.contains("1.25x") && out.contains("7/7"), "{out}");
    }
}
