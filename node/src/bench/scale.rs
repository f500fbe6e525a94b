//! `cdtester bench scale`: does more nodes mean less time? Networks of 1, 2, 4 and 8 node
//! processes, each confined with its pytest processes to a fixed share of a CPU (0.25 by
//! default) by its own cgroup (v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), evaluate the same
//! workload: a generated course of small projects (`--workload course`, the default) or corpus
//! projects (`--workload corpus`, a small subset unless `--only` names others); the wall time
//! from submission to completion gives the speedup and efficiency against 1 node. Every run
//! must give the workload's exact counts (the course's totals, the corpus manifest's run-alone
//! counts of every module).
//!
//! Untimed: one warm-up evaluation per network (environments, warm servers, duration memory);
//! then the timed evaluation on the same network. Needs root (cgroups).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdtester_config::Config;

use super::CorpusArgs;
use crate::client::Client;
use crate::corpus::{self, CorpusProject, ExpectedCounts};
use crate::demo::{LocalCluster, Placement};
use crate::eval::{EvalReport, EvalStatus};

/// The corpus projects `--workload corpus` evaluates unless `--only` names others: small ones,
/// so that the 1-node run at 0.25 CPU stays within minutes.
const SCALE_CORPUS: &[&str] = &["six", "toml", "colorama", "tabulate"];

/// What the networks evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// The generated course (`--projects`, `--modules`, `--test-ms`).
    Course,
    /// Corpus projects (`--only`, `--cache`, `--corpus`).
    Corpus,
}

/// Options of `cdtester bench scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Network sizes to measure (the first is the reference).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub sizes: Vec<usize>,
    /// CPU share of each node (with its tests).
    #[arg(long, default_value_t = 0.25)]
    pub cpus: f64,
    /// Projects of the generated course.
    #[arg(long, default_value_t = 16)]
    pub projects: usize,
    /// Test modules per project (5 tests each, one failing).
    #[arg(long, default_value_t = 4)]
    pub modules: usize,
    /// CPU milliseconds each test spends (at full speed).
    #[arg(long, default_value_t = 40)]
    pub test_ms: u64,
    /// The nodes' failure timeout (ms): a node held to a CPU share on a loaded machine can miss
    /// the default 2 s and be declared failed.
    #[arg(long, default_value_t = 6000)]
    pub failure_timeout_ms: u64,
    /// Give up on an evaluation after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_s: u64,
    /// What the networks evaluate.
    #[arg(long, value_enum, default_value = "course")]
    pub workload: Workload,
    #[command(flatten)]
    pub corpus: CorpusArgs,
}

/// Checks a finished evaluation's report.
type Check = dyn Fn(&EvalReport) -> anyhow::Result<()> + Send + Sync;

/// A workload ready to submit: the zip, how to check a finished report, extra node settings
/// (TOML) and a one-line description.
struct Prepared {
    zip: Vec<u8>,
    check: Box<Check>,
    rules: String,
    what: String,
}

/// The generated course, written under `dir`.
fn course_workload(dir: &Path, args: &Args) -> anyhow::Result<Prepared> {
    let want = write_course(dir, args)?;
    let roots: Vec<(String, PathBuf)> =
        (0..args.projects).map(|p| (format!("student{p:02}"), dir.join(format!("student{p:02}")))).collect();
    let modules = args.projects * args.modules;
    Ok(Prepared {
        zip: crate::fetch::pack_projects(&roots)?,
        check: Box::new(move |r: &EvalReport| {
            let got = (r.summary.total_passed, r.summary.total_failed);
            if got != want {
                bail!("the course gave {got:?} (passed, failed), expected {want:?}");
            }
            Ok(())
        }),
        rules: String::new(),
        what: format!(
            "course: {} projects, {modules} modules, {} tests ({} ms CPU each)",
            args.projects,
            modules * 5,
            args.test_ms
        ),
    })
}

/// Corpus projects fetched (sdists cached) and unpacked under `dir`.
fn corpus_workload(dir: &Path, args: &Args, config: &Config) -> anyhow::Result<Prepared> {
    let projects: Vec<CorpusProject> = args.corpus.projects(Some(SCALE_CORPUS))?;
    let python = cdtester_runners::local::resolve_python(config.runner.local.python.as_deref())?;
    let cache = args.corpus.cache_dir(config);
    let mut roots = Vec::new();
    for p in &projects {
        let sdist = corpus::fetch(p, &python, &cache)?;
        roots.push((p.project_root.clone(), corpus::unpack(p, &sdist, dir)?));
    }
    let expected: Vec<(String, std::collections::BTreeMap<String, ExpectedCounts>)> =
        projects.iter().map(|p| (p.project_root.clone(), p.expected_alone())).collect();
    let modules: usize = expected.iter().map(|(_, m)| m.len()).sum();
    let names: Vec<&str> = projects.iter().map(|p| p.name.as_str()).collect();
    Ok(Prepared {
        zip: crate::fetch::pack_projects(&roots)?,
        check: Box::new(move |r: &EvalReport| {
            for (name, alone) in &expected {
                let project = r.projects.get(name).with_context(|| format!("no project {name}"))?;
                for (m, want) in alone {
                    let got = project.modules.get(m).map(|v| ExpectedCounts::of(&v.counts));
                    if got.as_ref() != Some(want) {
                        bail!("{name} {m}: {got:?}, expected {want:?}");
                    }
                }
            }
            Ok(())
        }),
        rules: super::cluster::rules_toml(&projects),
        what: format!("corpus: {} ({modules} modules)", names.join(", ")),
    })
}

/// Writes the course: `projects` folders with `modules` test modules of 5 busy tests each
/// (the fifth fails); returns the expected (passed, failed) totals.
fn write_course(dir: &Path, args: &Args) -> anyhow::Result<(u64, u64)> {
    for p in 0..args.projects {
        let root = dir.join(format!("student{p:02}"));
        std::fs::create_dir_all(root.join("tests"))?;
        std::fs::write(
            root.join("work.py"),
            "import time\n\ndef busy(ms):\n    end = time.process_time() + ms / 1000\n    n = 0\n    while time.process_time() < end:\n        n += 1\n    return n\n",
        )?;
        for m in 0..args.modules {
            let mut text = String::from("from work import busy\n\n");
            for t in 0..5 {
                let check = if t == 4 { "== -1" } else { "> 0" };
                text.push_str(&format!("def test_{t}():\n    assert busy({}) {check}\n\n", args.test_ms));
            }
            std::fs::write(root.join("tests").join(format!("test_m{m}.py")), text)?;
        }
    }
    let modules = (args.projects * args.modules) as u64;
    Ok((modules * 4, modules))
}

/// A cgroup limiting its members to `cpus` of a CPU, removed on drop (after its processes).
struct CpuGroup {
    dir: PathBuf,
}

impl CpuGroup {
    fn new(name: &str, cpus: f64) -> anyhow::Result<CpuGroup> {
        let period = 100_000u64;
        let quota = ((cpus * period as f64) as u64).max(1000);
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
        let dir =
            if v2 { PathBuf::from("/sys/fs/cgroup") } else { PathBuf::from("/sys/fs/cgroup/cpu") }.join(name);
        std::fs::create_dir_all(&dir).with_context(|| {
            format!("creating the cgroup {} (needs root and a writable cgroup file system)", dir.display())
        })?;
        let group = CpuGroup { dir };
        if v2 {
            std::fs::write(group.dir.join("cpu.max"), format!("{quota} {period}"))
        } else {
            std::fs::write(group.dir.join("cpu.cfs_period_us"), period.to_string())
                .and_then(|_| std::fs::write(group.dir.join("cpu.cfs_quota_us"), quota.to_string()))
        }
        .with_context(|| format!("limiting the CPU of {}", group.dir.display()))?;
        Ok(group)
    }

    /// A command prefix that puts the command into this group before it starts.
    fn wrapper(&self) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        let script = format!("echo $$ > '{}' && exec \"$@\"", procs.display());
        ["sh".to_string(), "-c".to_string(), script, "sh".to_string()].to_vec()
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "cannot remove the cgroup: {e}");
        }
    }
}

/// Submits the workload to the first node and waits; returns the wall time after checking the
/// results.
async fn evaluate(cluster: &LocalCluster, work: &Prepared, limit: Duration) -> anyhow::Result<f64> {
    let client = Client::new(cluster.nodes[0].http);
    let started = Instant::now();
    let id = client.submit_zip(work.zip.clone(), "workload.zip").await?;
    loop {
        if started.elapsed() > limit {
            bail!("evaluation {id} did not finish within {limit:?}");
        }
        let r = client.progress(id).await?;
        if r.status == EvalStatus::Finished {
            let wall = started.elapsed().as_secs_f64();
            (work.check)(&client.report(id).await?)?;
            return Ok(wall);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `n` confined nodes, warms them up, times one evaluation.
async fn measure(
    n: usize,
    args: &Args,
    exe: &Path,
    dir: &Path,
    env: &[(String, String)],
    work: &Prepared,
) -> anyhow::Result<f64> {
    let groups: Vec<CpuGroup> = (0..n)
        .map(|i| CpuGroup::new(&format!("cdtester-scale-{}-{n}-{i}", std::process::id()), args.cpus))
        .collect::<anyhow::Result<_>>()?;
    let mut cluster = LocalCluster::new(exe.to_path_buf(), dir.join(format!("net{n}")), env.to_vec());
    for g in &groups {
        let (udp, http) = crate::demo::free_ports().context("finding free ports")?;
        cluster.start_at(Placement { wrapper: g.wrapper(), ..Placement::loopback(udp, http) })?;
    }
    let timed = async {
        cluster.wait_mesh(Duration::from_secs(60)).await?;
        let limit = Duration::from_secs(args.timeout_s);
        evaluate(&cluster, work, limit).await.context("warm-up evaluation")?;
        evaluate(&cluster, work, limit).await
    }
    .await;
    cluster.shutdown();
    drop(cluster);
    drop(groups);
    timed
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    if args.sizes.is_empty() || args.sizes.contains(&0) || args.projects == 0 || args.modules == 0 {
        bail!("--sizes, --projects and --modules must be at least 1");
    }
    if !(0.01..=64.0).contains(&args.cpus) {
        bail!("--cpus must be between 0.01 and 64");
    }
    let work = tempfile::Builder::new().prefix("cdtester-bench-scale-").tempdir()?;
    let workload = match args.workload {
        Workload::Course => course_workload(&work.path().join("course"), &args)?,
        Workload::Corpus => corpus_workload(&work.path().join("corpus"), &args, config)?,
    };
    let config_file = work.path().join("cdtester.toml");
    std::fs::write(&config_file, &workload.rules).context("writing the nodes' configuration")?;
    let venvs = config.runner.local.venv_dir.clone().unwrap_or_else(crate::demo::shared_venv_dir);
    let env = vec![
        ("CDT_CONFIG".to_string(), config_file.to_string_lossy().into_owned()),
        ("CDT_RUNNER__LOCAL__VENV_DIR".to_string(), venvs.to_string_lossy().into_owned()),
        ("CDT_RUNNER__WORKERS".to_string(), "1".to_string()),
        ("CDT_LOG".to_string(), "warn".to_string()),
        ("CDT_TIMERS__FAILURE_TIMEOUT_MS".to_string(), args.failure_timeout_ms.to_string()),
    ];
    let exe = std::env::current_exe().context("locating the cdtester binary")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    println!(
        "{}; each node {} CPU, 1 worker, failure timeout {} ms",
        workload.what, args.cpus, args.failure_timeout_ms
    );
    println!("{:>6} {:>9} {:>8} {:>11}", "nodes", "wall s", "speedup", "efficiency");
    let mut reference: Option<(usize, f64)> = None;
    for &n in &args.sizes {
        let wall = runtime.block_on(measure(n, &args, &exe, work.path(), &env, &workload))?;
        let (n0, w0) = *reference.get_or_insert((n, wall));
        let speedup = w0 / wall;
        let efficiency = speedup * n0 as f64 / n as f64;
        println!("{n:>6} {wall:>9.2} {speedup:>7.2}x {:>10.0}%", efficiency * 100.0);
    }
    Ok(())
}
