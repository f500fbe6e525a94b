//! `cdtester bench local`: the corpus under plain sequential pytest, `pytest -n 2`
//! (pytest-xdist) and cdtester's local evaluation with 2 workers, timed in one run.
//!
//! Untimed preparation per project: fetch and unpack the sdist (twice: the baselines and cdtester
//! each get their own tree), build the environments (one with pytest-xdist for the two
//! baselines, cdtester's own), then one untimed cdtester pass, which
//! compiles the bytecode every later run reuses and fills the per-module duration memory that
//! cdtester's planner uses (longest first, dominant slow modules split into chunks). Then the
//! timed runs, in this order: sequential, xdist, cdtester. cdtester's time covers everything
//! `cdtester run` does after start-up: preparation (environment lookup), discovery and the runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use cdtester_config::Config;
use cdtester_plugins::PolicySet;
use cdtester_runner_api::{ProjectSource, Runner};
use cdtester_runners::local::{LocalRunner, resolve_python};

use super::CorpusArgs;
use crate::corpus::{self, CorpusProject, ExpectedCounts};
use crate::eval::ProjectStatus;
use crate::registry::{self, Registry};
use crate::run_cmd::{LocalSession, ProjectInput};

/// Options of `cdtester bench local`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Workers for xdist (-n) and for cdtester.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

/// The xdist the baseline uses (the corpus numbers were measured with it).
pub(crate) const XDIST_REQUIREMENT: &str = "pytest-xdist==3.8.0";

struct Row {
    name: String,
    seq: f64,
    xdist: f64,
    xdist_ok: bool,
    cdt: f64,
    /// CPU seconds (user + sys) of each, in the same order: robust to other load on the machine.
    cpu: [f64; 3],
    matches: usize,
    modules: usize,
}

/// User + sys CPU seconds of this process (`RUSAGE_SELF`) or of its waited-for descendants
/// (`RUSAGE_CHILDREN`).
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds used so far by this process and every descendant: reaped ones, and live ones
/// (the local runner's warm zygotes outlive an evaluation) with what they have reaped.
fn cpu_total() -> f64 {
    let own = std::process::id();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let live: f64 = super::memory::tree_processes(own)
        .into_iter()
        .filter(|(pid, _)| *pid != own)
        .filter_map(|(pid, _)| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // utime, stime, cutime, cstime: fields 14-17, counted after the `(comm)` field.
            let rest = stat.get(stat.rfind(')')? + 2..)?;
            let f: Vec<f64> =
                rest.split_whitespace().skip(11).take(4).filter_map(|v| v.parse().ok()).collect();
            Some(f.iter().sum::<f64>() / tick)
        })
        .sum();
    cpu_seconds(libc::RUSAGE_SELF) + cpu_seconds(libc::RUSAGE_CHILDREN) + live
}

/// Fetches and unpacks a corpus project under `dir` and builds its baseline environment (its test
/// dependencies plus pytest-xdist; untimed). Returns the project root and the interpreter that
/// runs plain pytest and xdist there.
pub(crate) fn baseline_project(
    p: &CorpusProject,
    baseline: &LocalRunner,
    python: &Path,
    cache: &Path,
    dir: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let sdist = corpus::fetch(p, python, cache)?;
    let root = corpus::unpack(p, &sdist, dir)?;
    let mut reqs = p.test_deps.clone();
    reqs.push(XDIST_REQUIREMENT.into());
    let source = ProjectSource {
        id: format!("bench-{}", p.name),
        name: p.project_root.clone(),
        root: root.clone(),
        extra_requirements: reqs,
    };
    let prepared = baseline.prepare(&source).map_err(|e| anyhow::anyhow!("{}: {e}", p.name))?;
    let base_python = baseline.interpreter(&prepared).context("baseline interpreter");
    baseline.release(&prepared);
    Ok((root, base_python?))
}

/// cdtester's own unpacked copy of a corpus project under `dir`: what the baselines write into
/// their tree (pytest-cov's `.coverage`, for one) would otherwise change the content cdtester
/// sees between its runs, and with it everything it remembers by content.
fn pristine_copy(p: &CorpusProject, python: &Path, cache: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let sdist = corpus::fetch(p, python, cache)?;
    Ok(corpus::unpack(p, &sdist, &dir.join("cdtester"))?)
}

pub(crate) fn time_pytest(
    python: &Path,
    root: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(f64, i32)> {
    let started = Instant::now();
    let status = Command::new(python)
        .args(["-m", "pytest", "-p", "no:cacheprovider"])
        .args(extra)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running pytest in {}", root.display()))?;
    Ok((started.elapsed().as_secs_f64(), status.code().unwrap_or(-1)))
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let projects: Vec<CorpusProject> = args.corpus.projects(None)?;
    let cache = args.corpus.cache_dir(config);
    let python = resolve_python(config.runner.local.python.as_deref())?;
    let mut config = config.clone();
    config.projects = corpus::requirement_rules(&projects);
    config.runner.default = "local".into();
    config.runner.workers = args.workers;
    let policies = PolicySet::load(&config.plugins).context("loading policy plugins")?;
    let baseline = registry::local_runner(&config)?;
    let runners = crate::app::registry_lookup(Registry::from_config(&config));
    let session = LocalSession::open(config.clone(), runners, policies)?;
    let work = tempfile::Builder::new().prefix("cdtester-bench-").tempdir()?;

    let mut rows = Vec::new();
    let mut evaluated: Vec<ProjectInput> = Vec::new();
    for p in &projects {
        eprintln!("== {} {}: preparing (untimed)", p.name, p.version);
        let (root, base_python) = baseline_project(p, &baseline, &python, &cache, work.path())?;
        let own = pristine_copy(p, &python, &cache, work.path())?;
        let input = [ProjectInput { name: p.project_root.clone(), root: own }];
        evaluated.push(input[0].clone());
        let warm_up = session.evaluate(&input)?;
        if let Some(e) = warm_up.projects.values().find_map(|r| r.error.clone()) {
            eprintln!("   skipped: cdtester cannot evaluate it: {e}");
            continue;
        }

        let c0 = cpu_total();
        let (seq, _) = time_pytest(&base_python, &root, &[])?;
        let c1 = cpu_total();
        let n = args.workers.to_string();
        let (xdist, xcode) = time_pytest(&base_python, &root, &["-n", &n])?;
        let c2 = cpu_total();
        let started = Instant::now();
        // Includes the warm workers: `evaluate` releases (and so reaps) them before returning.
        let eval = session.evaluate(&input)?;
        let cdt = started.elapsed().as_secs_f64();
        let c3 = cpu_total();

        let expected = p.expected_alone();
        let mut matches = 0;
        if let Some(r) = eval.projects.values().next() {
            for (module, m) in &r.modules {
                if expected.get(module) == Some(&ExpectedCounts::of(&m.counts)) {
                    matches += 1;
                }
            }
        }
        eprintln!("   sequential {seq:.2} s, xdist {xdist:.2} s (exit {xcode}), cdtester {cdt:.2} s");
        rows.push(Row {
            name: p.name.clone(),
            seq,
            xdist,
            xdist_ok: xcode == 0 || xcode == 1,
            cdt,
            cpu: [c1 - c0, c2 - c1, c3 - c2],
            matches,
            modules: expected.len(),
        });
    }
    // How graders use it: every project in one `cdtester run`, all tasks on one pool, longest
    // first, so one project's tail overlaps the next one's start.
    eprintln!("== all {} projects in one evaluation", evaluated.len());
    let started = Instant::now();
    let all = session.evaluate(&evaluated)?;
    let together = started.elapsed().as_secs_f64();
    let failed: Vec<&str> = all
        .projects
        .iter()
        .filter(|(_, p)| p.status == ProjectStatus::Failed)
        .map(|(name, _)| name.as_str())
        .collect();
    print!("{}", render(&rows, args.workers));
    println!("{}", together_line(&rows, together, args.workers, &failed));
    Ok(())
}

/// The whole corpus in one run against the per-project sums.
fn together_line(rows: &[Row], together: f64, workers: usize, failed: &[&str]) -> String {
    let xdist_sum: f64 = rows.iter().map(|r| r.xdist).sum();
    let best_sum: f64 = rows.iter().map(|r| r.seq.min(r.xdist)).sum();
    format!(
        "all projects in one `cdtester run`: {together:.2} s = {:.2}x of the summed xdist time ({xdist_sum:.2} s), \
         {:.2}x of the better of sequential and pytest -n {workers} per project, summed ({best_sum:.2} s; target at most 0.75x){}",
        together / xdist_sum.max(f64::EPSILON),
        together / best_sum.max(f64::EPSILON),
        if failed.is_empty() { String::new() } else { format!("; not evaluated: {}", failed.join(", ")) }
    )
}

fn render(rows: &[Row], workers: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let xd = format!("xdist{workers}");
    let _ = writeln!(
        s,
        "{:<16} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>9} | {:>8}",
        "project",
        "seq s",
        format!("{xd} s"),
        "best s",
        "cdt s",
        "cdt/xdist",
        "cdt/seq",
        "seq cpu",
        "xd cpu",
        "cdt cpu",
        "cdt/xdist",
        "modules="
    );
    let (mut t, mut tc, mut best) = ([0.0f64; 3], [0.0f64; 3], 0.0f64);
    for r in rows {
        for (i, v) in [r.seq, r.xdist, r.cdt].into_iter().enumerate() {
            t[i] += v;
            tc[i] += r.cpu[i];
        }
        best += r.seq.min(r.xdist);
        let _ = writeln!(
            s,
            "{:<16} {:>8.2} {:>7.2}{} {:>8.2} {:>8.2} {:>8.2}x {:>8.2}x | {:>8.2} {:>8.2} {:>8.2} {:>8.2}x | {:>5}/{}",
            r.name,
            r.seq,
            r.xdist,
            if r.xdist_ok { " " } else { "!" },
            r.seq.min(r.xdist),
            r.cdt,
            r.cdt / r.xdist.max(f64::EPSILON),
            r.cdt / r.seq.max(f64::EPSILON),
            r.cpu[0],
            r.cpu[1],
            r.cpu[2],
            r.cpu[2] / r.cpu[1].max(f64::EPSILON),
            r.matches,
            r.modules
        );
    }
    let _ = writeln!(
        s,
        "{:<16} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}x {:>8.2}x | {:>8.2} {:>8.2} {:>8.2} {:>8.2}x",
        "TOTAL",
        t[0],
        t[1],
        best,
        t[2],
        t[2] / t[1].max(f64::EPSILON),
        t[2] / t[0].max(f64::EPSILON),
        tc[0],
        tc[1],
        tc[2],
        tc[2] / tc[1].max(f64::EPSILON)
    );
    let _ = writeln!(
        s,
        "(wall seconds, then CPU seconds user+sys of all processes; ! = xdist did not complete normally; \
         best = the better of sequential and xdist; modules= = modules whose counts equal the corpus \
         run-alone expectation)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_and_ratios() {
        let rows = vec![
            Row {
                name: "a".into(),
                seq: 2.0,
                xdist: 4.0,
                xdist_ok: true,
                cdt: 1.0,
                cpu: [2.0, 5.0, 2.0],
                matches: 3,
                modules: 3,
            },
            Row {
                name: "b".into(),
                seq: 6.0,
                xdist: 4.0,
                xdist_ok: false,
                cdt: 3.0,
                cpu: [6.0, 7.0, 3.0],
                matches: 1,
                modules: 2,
            },
        ];
        let out = render(&rows, 2);
        let total = out.lines().find(|l| l.starts_with("TOTAL")).unwrap();
        assert!(total.contains("8.00") && total.contains("4.00") && total.contains("0.50x"), "{out}");
        assert!(total.contains(" 6.00 "), "best of 2.0/4.0 and 6.0/4.0 summed: {out}");
        assert!(total.contains("12.00") && total.contains("0.42x"), "{out}");
        assert!(out.contains("4.00!"), "{out}");
        assert!(out.contains("1/2"), "{out}");
    }
}
