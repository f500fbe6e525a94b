//! `cdtester bench docker`: what running modules in the docker runner costs over the local
//! runner, on corpus projects.
//!
//! Untimed per project: fetch and unpack the sdist; prepare it in both runners (environments,
//! and for docker the offline environment build); discover its modules in both (for docker this
//! also starts the project's container); one untimed pass of every module in both runners (warm
//! caches, bytecode). Timed: every module as its own task, one at a time, local then docker,
//! interleaved module by module so both see the same machine load; `--rounds` repeats and the
//! per-module median is kept. The container start (create + start + project copy) is measured
//! separately on a fresh container per project and reported as its own column, since the
//! runner pays it once per project and node, not per module.

use std::time::Instant;

use anyhow::{Context, bail};
use cdtester_config::Config;
use cdtester_runner_api::{Limits, PreparedProject, ProjectSource, Runner, TaskSpec};
use cdtester_runners::docker::DockerRunner;
use cdtester_runners::local::resolve_python;

use super::CorpusArgs;
use crate::corpus::{self, CorpusProject, ExpectedCounts};
use crate::registry;

/// Projects measured when `--only` is not given: small and mid-size modules of every layout
/// (flat, in-package, `test/` folder, src layout installed offline, hypothesis).
const DEFAULT_SUBSET: &[&str] =
    &["toml", "colorama", "tabulate", "cachetools", "pyasn1", "simplejson", "attrs"];

/// Options of `cdtester bench docker`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// `--only` defaults to a subset of every layout.
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Timed rounds; each module's median is kept.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

struct Row {
    name: String,
    modules: usize,
    local: f64,
    docker: f64,
    container_start: f64,
    local_ok: usize,
    docker_ok: usize,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// Runs `module` alone; returns the wall time and whether its counts match the expectation.
fn time_module(
    runner: &dyn Runner,
    project: &PreparedProject,
    module: &str,
    limits: &Limits,
    expected: Option<&ExpectedCounts>,
) -> anyhow::Result<(f64, bool)> {
    let task = TaskSpec::new(format!("bench-{module}"), vec![module.to_string()]);
    let started = Instant::now();
    let report =
        runner.run(project, &task, limits).with_context(|| format!("{}: {module}", runner.name()))?;
    let wall = started.elapsed().as_secs_f64();
    let ok = report.modules.len() == 1 && expected == Some(&ExpectedCounts::of(&report.modules[0].counts()));
    Ok((wall, ok))
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let projects: Vec<CorpusProject> = args.corpus.projects(Some(DEFAULT_SUBSET))?;
    let cache = args.corpus.cache_dir(config);
    let python = resolve_python(config.runner.local.python.as_deref())?;
    let local = registry::local_runner(config)?;
    let docker =
        DockerRunner::new(registry::docker_settings(config)).context("starting the docker runner")?;
    let limits = config.runner.limits.clone();
    let work = tempfile::Builder::new().prefix("cdtester-bench-docker-").tempdir()?;

    let mut rows = Vec::new();
    for p in &projects {
        eprintln!("== {} {}: preparing (untimed)", p.name, p.version);
        let sdist = corpus::fetch(p, &python, &cache)?;
        let root = corpus::unpack(p, &sdist, work.path())?;
        let source = ProjectSource {
            id: format!("bench-docker-{}", p.name),
            name: p.project_root.clone(),
            root,
            extra_requirements: p.test_deps.clone(),
        };
        let in_local = local.prepare(&source).map_err(|e| anyhow::anyhow!("{} (local): {e}", p.name))?;
        let in_docker = docker.prepare(&source).map_err(|e| anyhow::anyhow!("{} (docker): {e}", p.name))?;
        let modules = local.discover(&in_local).map_err(|e| anyhow::anyhow!("{} (local): {e}", p.name))?;
        let docker_modules =
            docker.discover(&in_docker).map_err(|e| anyhow::anyhow!("{} (docker): {e}", p.name))?;
        if modules != docker_modules {
            eprintln!("   note: discovery differs: local {modules:?}, docker {docker_modules:?}");
        }
        // The container start, on a fresh container: release drops the pooled one.
        docker.release(&in_docker);
        let in_docker = docker.prepare(&source).map_err(|e| anyhow::anyhow!("{} (docker): {e}", p.name))?;
        let expected = p.expected_alone();
        let first = modules.first().context("no modules")?;
        let started = Instant::now();
        time_module(&docker, &in_docker, first, &limits, expected.get(first))?;
        let cold_first = started.elapsed().as_secs_f64();
        for m in &modules {
            time_module(&local, &in_local, m, &limits, expected.get(m))?;
            time_module(&docker, &in_docker, m, &limits, expected.get(m))?;
        }
        let (warm_first, _) = time_module(&docker, &in_docker, first, &limits, expected.get(first))?;
        let container_start = (cold_first - warm_first).max(0.0);

        let (mut local_total, mut docker_total, mut local_ok, mut docker_ok) = (0.0, 0.0, 0, 0);
        for m in &modules {
            let (mut lt, mut dt) = (Vec::new(), Vec::new());
            let (mut lok, mut dok) = (true, true);
            for _ in 0..args.rounds {
                let (t, ok) = time_module(&local, &in_local, m, &limits, expected.get(m))?;
                lt.push(t);
                lok &= ok;
                let (t, ok) = time_module(&docker, &in_docker, m, &limits, expected.get(m))?;
                dt.push(t);
                dok &= ok;
            }
            local_total += median(lt);
            docker_total += median(dt);
            local_ok += usize::from(lok);
            docker_ok += usize::from(dok);
        }
        eprintln!(
            "   local {local_total:.2} s, docker {docker_total:.2} s, container start {container_start:.2} s"
        );
        rows.push(Row {
            name: p.name.clone(),
            modules: modules.len(),
            local: local_total,
            docker: docker_total,
            container_start,
            local_ok,
            docker_ok,
        });
        local.release(&in_local);
        docker.release(&in_docker);
    }
    docker.shutdown();
    print!("{}", render(&rows, args.rounds));
    Ok(())
}

fn render(rows: &[Row], rounds: usize) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>7} {:>9} {:>9} {:>8} {:>14} {:>10} {:>9} {:>9}",
        "project",
        "modules",
        "local s",
        "docker s",
        "ratio",
        "overhead/mod s",
        "start s",
        "local=",
        "docker="
    );
    let (mut tl, mut td, mut ts, mut tm) = (0.0, 0.0, 0.0, 0usize);
    for r in rows {
        tl += r.local;
        td += r.docker;
        ts += r.container_start;
        tm += r.modules;
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>9.2} {:>9.2} {:>7.2}x {:>14.3} {:>10.2} {:>5}/{:<3} {:>5}/{:<3}",
            r.name,
            r.modules,
            r.local,
            r.docker,
            r.docker / r.local.max(f64::EPSILON),
            (r.docker - r.local) / r.modules.max(1) as f64,
            r.container_start,
            r.local_ok,
            r.modules,
            r.docker_ok,
            r.modules
        );
    }
    let _ = writeln!(
        s,
        "{:<12} {:>7} {:>9.2} {:>9.2} {:>7.2}x {:>14.3} {:>10.2}",
        "TOTAL",
        tm,
        tl,
        td,
        td / tl.max(f64::EPSILON),
        (td - tl) / tm.max(1) as f64,
        ts
    );
    let _ = writeln!(
        s,
        "(per-module wall time, median of {rounds} interleaved rounds, one module per task, one at a time; \
         ratio = docker/local, target <= 1.5x; start = creating, starting and filling one container, paid \
         once per project and node; local=/docker= = modules whose counts equal the corpus run-alone expectation)"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn table_has_totals_and_ratio() {
        let rows = vec![
            Row {
                name: "a".into(),
                modules: 2,
                local: 1.0,
                docker: 1.5,
                container_start: 0.5,
                local_ok: 2,
                docker_ok: 2,
            },
            Row {
                name: "b".into(),
                modules: 2,
                local: 3.0,
                docker: 3.5,
                container_start: 0.5,
                local_ok: 2,
                docker_ok: 1,
            },
        ];
        let out = render(&rows, 3);
        let total = out.lines().find(|l| l.starts_with("TOTAL")).unwrap();
        assert!(total.contains("1.25x"), "{total}");
        assert!(total.contains("0.250"), "{total}");
        assert!(out.contains("1/2"));
    }
}
