//! `cdtester bench course`: grading one assignment's student projects, the job cdtester exists
//! for. Generates N small projects (one module under test, 4 test modules of 25 tests each; each
//! student's functions carry seeded bugs, deterministic for a seed), then times, side by side in
//! one run: plain `python -m pytest` in each project one after the other, the
//! `ls | xargs -P 2 -I{} sh -c 'cd {} && python -m pytest -q'` shell loop, `pytest -n 2` in each
//! project, and the `cdtester run` binary on the whole folder (first run with an empty data
//! folder, then two warm runs). Every project's counts from sequential pytest and from cdtester
//! must equal what the seeded bugs make fail. Then one `cdtester run` of a larger folder (200
//! projects by default) samples the resident memory of its whole process tree and of each warm
//! pytest zygote.
//!
//! Untimed preparation: the Python environments (pytest, and pytest-xdist for `-n 2`) and one
//! pytest run that compiles pytest's bytecode. Every command gets `-p no:cacheprovider`, as
//! cdtester's runs do.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdtester_config::Config;
use cdtester_runner_api::{ProjectSource, Runner};

use super::local::{XDIST_REQUIREMENT, time_pytest};
use super::memory::tree_processes;
use crate::registry;

/// Options of `cdtester bench course`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Student projects to generate and time.
    #[arg(long, default_value_t = 60)]
    pub projects: usize,
    /// Seed of the students' bugs.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Parallel jobs of the shell loop, `pytest -n` and cdtester's workers.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Projects of the memory run (0: skip it).
    #[arg(long, default_value_t = 200)]
    pub memory_projects: usize,
}

/// The assignment: a function, its correct Python body, a student's buggy body, and the test
/// inputs (the same for every student).
struct Exercise {
    name: &'static str,
    params: &'static str,
    good: &'static str,
    bad: &'static str,
    /// Whether the buggy body fails on this input.
    fails: fn(i64) -> bool,
    /// The correct result for this input, as a Python literal.
    expect: fn(i64) -> String,
    /// The call's arguments for this input.
    call: fn(i64) -> String,
}

const TESTS_PER_MODULE: usize = 25;

const EXERCISES: [Exercise; 4] = [
    Exercise {
        name: "clamp",
        params: "x, lo, hi",
        good: "return max(lo, min(x, hi))",
        bad: "return max(lo, min(x, hi - 1))",
        fails: |x| x >= 25,
        expect: |x| x.clamp(0, 25).to_string(),
        call: |x| format!("{x}, 0, 25"),
    },
    Exercise {
        name: "digit_sum",
        params: "n",
        good: "return sum(int(c) for c in str(abs(n)))",
        bad: "return sum(int(c) for c in str(n))",
        fails: |n| n < 0,
        expect: |n| {
            n.unsigned_abs().to_string().bytes().map(|b| u64::from(b - b'0')).sum::<u64>().to_string()
        },
        call: |n| n.to_string(),
    },
    Exercise {
        name: "letter",
        params: "score",
        good: "for bound, l in ((90, 'A'), (80, 'B'), (70, 'C'), (60, 'D')):\n        if score >= bound:\n            return l\n    return 'F'",
        bad: "for bound, l in ((90, 'A'), (80, 'B'), (70, 'C'), (60, 'D')):\n        if score > bound:\n            return l\n    return 'F'",
        fails: |s| [90, 80, 70, 60].contains(&s),
        expect: |s| {
            let l = [(90, "A"), (80, "B"), (70, "C"), (60, "D")]
                .iter()
                .find(|(b, _)| s >= *b)
                .map_or("F", |x| x.1);
            format!("'{l}'")
        },
        call: |s| s.to_string(),
    },
    Exercise {
        name: "fizz",
        params: "n",
        good: "if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)",
        bad: "if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    return str(n)",
        fails: |n| n % 15 == 0,
        expect: |n| {
            let s = match (n % 3, n % 5) {
                (0, 0) => "FizzBuzz".to_string(),
                (0, _) => "Fizz".to_string(),
                (_, 0) => "Buzz".to_string(),
                _ => n.to_string(),
            };
            format!("'{s}'")
        },
        call: |n| n.to_string(),
    },
];

/// splitmix64: a small deterministic generator (the same projects for a seed, on any machine).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `lo..hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
}

/// Per project, per test module: (passed, failed) that the seeded bugs give.
type Expected = BTreeMap<String, BTreeMap<String, (u64, u64)>>;

/// The test inputs of every exercise (the same for every student; boundaries included).
fn inputs(seed: u64) -> Vec<Vec<i64>> {
    let mut rng = Rng(seed);
    let ranges = [(-10, 40), (-500, 500), (40, 101), (1, 100)];
    let fixed: [&[i64]; 4] = [&[25, 30], &[-7, 0], &[90, 80, 70, 60], &[15, 30]];
    (0..EXERCISES.len())
        .map(|e| {
            let mut v = fixed[e].to_vec();
            while v.len() < TESTS_PER_MODULE {
                v.push(rng.range(ranges[e].0, ranges[e].1));
            }
            v
        })
        .collect()
}

/// Writes `n` student projects (`s000`, `s001`, ...) under `dir`; returns their expected counts.
/// `tag` goes into a comment of each project: the same tag gives the same files, a new one new
/// content (cdtester remembers content it has seen; see the local runner's shared sessions).
fn generate(dir: &Path, n: usize, seed: u64, tag: &str) -> anyhow::Result<Expected> {
    let inputs = inputs(seed);
    let mut rng = Rng(seed ^ 0x5eed);
    let mut expected = Expected::new();
    for i in 0..n {
        let root = dir.join(format!("s{i:03}"));
        std::fs::create_dir_all(root.join("tests")).context("creating a project folder")?;
        // Like real submissions, no two projects are byte for byte the same.
        let mut code = format!("\"\"\"Assignment 3: small functions.\"\"\"\n# {tag}, student {i}\n");
        let modules = expected.entry(format!("s{i:03}")).or_default();
        for (e, ex) in EXERCISES.iter().enumerate() {
            // About one student function in three is wrong.
            let buggy = rng.next().is_multiple_of(3);
            let body = if buggy { ex.bad } else { ex.good };
            code.push_str(&format!("\n\ndef {}({}):\n    {body}\n", ex.name, ex.params));
            let failed = if buggy { inputs[e].iter().filter(|x| (ex.fails)(**x)).count() as u64 } else { 0 };
            let module = format!("tests/test_{}.py", ex.name);
            modules.insert(module.clone(), (TESTS_PER_MODULE as u64 - failed, failed));
            std::fs::write(root.join(&module), test_module(ex, &inputs[e])).context("writing a test")?;
        }
        std::fs::write(root.join("assignment.py"), code).context("writing a project")?;
    }
    Ok(expected)
}

fn test_module(ex: &Exercise, inputs: &[i64]) -> String {
    let cases: Vec<String> =
        inputs.iter().map(|x| format!("    (({},), {}),", (ex.call)(*x), (ex.expect)(*x))).collect();
    format!(
        "import pytest\n\nfrom assignment import {name}\n\nCASES = [\n{cases}\n]\n\n\n\
         @pytest.mark.parametrize(\"args, expected\", CASES)\ndef test_{name}(args, expected):\n    \
         assert {name}(*args) == expected\n",
        name = ex.name,
        cases = cases.join("\n")
    )
}

/// (passed, failed) from the last line of `pytest -q` (e.g. `3 failed, 97 passed in 0.41s`).
fn summary_counts(stdout: &str) -> (u64, u64) {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let (mut passed, mut failed) = (0, 0);
    for part in last.trim_matches(|c| c == '=' || c == ' ').split(" in ").next().unwrap_or("").split(", ") {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) else {
            continue;
        };
        match what {
            "passed" => passed = n,
            "failed" => failed = n,
            _ => {}
        }
    }
    (passed, failed)
}

/// Plain sequential pytest in every project: wall seconds and the projects whose counts differ
/// from `expected`.
fn sequential(python: &Path, dir: &Path, expected: &Expected) -> anyhow::Result<(f64, Vec<String>)> {
    let started = Instant::now();
    let mut wrong = Vec::new();
    for (name, modules) in expected {
        let out = Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .current_dir(dir.join(name))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("running pytest in {name}"))?;
        let want = modules.values().fold((0, 0), |a, m| (a.0 + m.0, a.1 + m.1));
        if summary_counts(&String::from_utf8_lossy(&out.stdout)) != want {
            wrong.push(name.clone());
        }
    }
    Ok((started.elapsed().as_secs_f64(), wrong))
}

/// The `xargs -P` shell loop over every project folder of `dir`.
fn shell_loop(python: &Path, dir: &Path, jobs: usize) -> anyhow::Result<f64> {
    let script = format!(
        "ls | xargs -P {jobs} -I{{}} sh -c 'cd {{}} && \"$0\" -m pytest -q -p no:cacheprovider >/dev/null' \"$PY\""
    );
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", &script])
        .env("PY", python)
        .current_dir(dir)
        .stdin(Stdio::null())
        .status()
        .context("running the shell loop")?;
    // xargs exits 123 when a command failed: failing tests are expected.
    if !matches!(status.code(), Some(0 | 123)) {
        bail!("the shell loop failed: {status}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What one `cdtester run` of a folder gave: wall seconds, projects whose counts differ from the
/// expectation, and the memory sampled during the run.
struct CdtRun {
    wall: f64,
    wrong: Vec<String>,
    peak_kib: u64,
    peak_procs: usize,
    /// Peak RSS (KiB) of each warm pytest zygote, by pid.
    zygotes: BTreeMap<u32, u64>,
}

/// How the `cdtester` binary is run: its data folder and environment cache.
struct CdtCommand {
    exe: PathBuf,
    env: Vec<(String, String)>,
    workers: usize,
}

impl CdtCommand {
    fn run(&self, dir: &Path, data: &Path, expected: &Expected) -> anyhow::Result<CdtRun> {
        std::fs::create_dir_all(data)?;
        let out_path = data.join("run.json");
        let err_path = data.join("run.err");
        let started = Instant::now();
        let mut child = Command::new(&self.exe)
            .args(["run", "--json", "--workers", &self.workers.to_string()])
            .arg(dir)
            .env_remove("CDT_CONFIG")
            .env("CDT_NODE__DATA_DIR", data)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .context("starting cdtester run")?;
        let mut sample = Sample::default();
        let status = loop {
            sample.take(child.id());
            if let Some(status) = child.try_wait()? {
                break status;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let wall = started.elapsed().as_secs_f64();
        if !status.success() {
            let err = std::fs::read_to_string(&err_path).unwrap_or_default();
            let tail = err.get(err.len().saturating_sub(2000)..).unwrap_or(&err);
            bail!("cdtester run failed ({status}): {tail}");
        }
        let eval: crate::eval::EvalReport = serde_json::from_slice(&std::fs::read(&out_path)?)
            .context("cdtester run --json printed no JSON")?;
        let wrong = compare(&eval, expected);
        Ok(CdtRun {
            wall,
            wrong,
            peak_kib: sample.peak_kib,
            peak_procs: sample.peak_procs,
            zygotes: sample.zygotes,
        })
    }
}

/// Peak memory of a process tree, sampled.
#[derive(Default)]
struct Sample {
    peak_kib: u64,
    peak_procs: usize,
    zygotes: BTreeMap<u32, u64>,
    /// Whether each pid seen is a zygote (its command line names the fork server).
    kind: HashMap<u32, bool>,
}

impl Sample {
    fn take(&mut self, pid: u32) {
        let procs = tree_processes(pid);
        self.peak_kib = self.peak_kib.max(procs.iter().map(|(_, rss)| rss).sum());
        self.peak_procs = self.peak_procs.max(procs.len());
        for (p, rss) in procs {
            let zygote = *self.kind.entry(p).or_insert_with(|| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                // A zygote runs `python .../cdtester_forkserver.py`; its forked children keep
                // that command line but are not direct children of the cdtester process.
                String::from_utf8_lossy(&cmd).contains("cdtester_forkserver.py") && parent_of(p) == Some(pid)
            });
            if zygote {
                let peak = self.zygotes.entry(p).or_default();
                *peak = (*peak).max(rss);
            }
        }
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// Projects whose per-module (passed, failed) in `cdtester run --json` output differ from
/// `expected` (or that have other verdicts, or are missing).
fn compare(eval: &crate::eval::EvalReport, expected: &Expected) -> Vec<String> {
    let mut got: Expected = Expected::new();
    let mut odd = Vec::new();
    for (name, p) in &eval.projects {
        for (module, m) in &p.modules {
            let c = &m.counts;
            if c.total() != c.passed + c.failed {
                odd.push(name.clone());
            }
            got.entry(name.clone()).or_default().insert(module.clone(), (c.passed, c.failed));
        }
    }
    let mut wrong: Vec<String> = expected
        .iter()
        .filter(|(name, modules)| got.get(*name) != Some(*modules))
        .map(|(n, _)| n.clone())
        .collect();
    wrong.extend(odd);
    wrong.sort();
    wrong.dedup();
    wrong
}

/// The machine's 1-minute load average (how busy the machine was around a measurement).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Untimed: the interpreters of the plain pytest environment (the one cdtester uses for these
/// projects) and of the pytest-xdist one, both built on the way.
fn environments(config: &Config, project: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let runner = registry::local_runner(config)?;
    let mut pythons = Vec::new();
    for reqs in [vec![], vec![XDIST_REQUIREMENT.to_string()]] {
        let source = ProjectSource {
            id: format!("bench-course-{}", reqs.len()),
            name: "course".into(),
            root: project.to_path_buf(),
            extra_requirements: reqs,
        };
        let prepared = runner.prepare(&source).map_err(|e| anyhow::anyhow!("preparing: {e}"))?;
        let python = runner.interpreter(&prepared).context("environment interpreter");
        runner.release(&prepared);
        pythons.push(python?);
    }
    Ok((pythons.remove(0), pythons.remove(0)))
}

pub fn run(args: Args, config: &Config) -> anyhow::Result<()> {
    if args.workers == 0 || args.projects == 0 {
        bail!("--workers and --projects must be at least 1");
    }
    let work = tempfile::Builder::new().prefix("cdtester-course-").tempdir()?;
    let course = work.path().join("course");
    // Content cdtester has never seen, so that its first run is a first run.
    let tag = format!("bench {} {:?}", std::process::id(), std::time::SystemTime::now());
    let expected = generate(&course, args.projects, args.seed, &tag)?;
    let (python, xdist_python) = environments(config, &course.join("s000"))?;
    let local = registry::local_options(config);
    let mut env = vec![
        ("CDT_RUNNER__LOCAL__VENV_DIR".to_string(), local.venv_dir.to_string_lossy().into_owned()),
        ("CDT_LOG".to_string(), "warn".to_string()),
    ];
    if let Some(p) = &local.python {
        env.push(("CDT_RUNNER__LOCAL__PYTHON".into(), p.to_string_lossy().into_owned()));
    }
    let cdt = CdtCommand { exe: std::env::current_exe()?, env, workers: args.workers };
    // Untimed: pytest's own bytecode compiled once.
    time_pytest(&python, &course.join("s000"), &[])?;
    let load_before = load_average();
    eprintln!("== {} projects: sequential pytest", args.projects);
    let (seq, seq_wrong) = sequential(&python, &course, &expected)?;
    eprintln!("== xargs -P {} shell loop", args.workers);
    let shell = shell_loop(&python, &course, args.workers)?;
    eprintln!("== pytest -n {} per project", args.workers);
    let n = args.workers.to_string();
    let started = Instant::now();
    for name in expected.keys() {
        time_pytest(&xdist_python, &course.join(name), &["-n", &n])?;
    }
    let xdist = started.elapsed().as_secs_f64();
    eprintln!("== cdtester run: first run, then two warm runs");
    let data = work.path().join("data");
    let runs: Vec<CdtRun> = (0..3).map(|_| cdt.run(&course, &data, &expected)).collect::<Result<_, _>>()?;
    let load_after = load_average();
    let wrong = print_times(&args, (seq, shell, xdist), &seq_wrong, &runs);
    println!("  machine load average (1 min): {load_before} before, {load_after} after");
    print_memory(&format!("{} projects, warm run", args.projects), &runs[2]);
    if args.memory_projects > 0 {
        let big = work.path().join("course-big");
        let expected = generate(&big, args.memory_projects, args.seed, &format!("{tag} big"))?;
        let run = cdt.run(&big, &data, &expected)?;
        print_memory(&format!("{} projects ({:.2} s)", args.memory_projects, run.wall), &run);
        if !run.wrong.is_empty() {
            println!("  counts DIFFER: {}", run.wrong.join(", "));
        }
    }
    if !wrong.is_empty() {
        bail!("counts differ");
    }
    Ok(())
}

/// Prints the timed runs (`(sequential, shell loop, xdist)` seconds and the `cdtester run`s)
/// with their ratios to the shell loop; returns the projects whose counts differ.
fn print_times(
    args: &Args,
    (seq, shell, xdist): (f64, f64, f64),
    seq_wrong: &[String],
    runs: &[CdtRun],
) -> Vec<String> {
    let warm = (runs[1].wall + runs[2].wall) / 2.0;
    let ratio = |t: f64| t / shell.max(f64::EPSILON);
    println!(
        "{} student projects ({} tests each), seed {}, {} workers/jobs; wall seconds, ratio to the shell loop",
        args.projects,
        4 * TESTS_PER_MODULE,
        args.seed,
        args.workers
    );
    let line = |label: &str, secs: f64, note: &str| {
        println!("  {label:<48} {secs:7.2} s  {:5.2}x{note}", ratio(secs));
    };
    let jobs = args.workers;
    line("sequential `python -m pytest` per project", seq, "");
    line(&format!("`ls | xargs -P {jobs} ... python -m pytest -q`"), shell, " (the shell loop)");
    line(&format!("`pytest -n {jobs}` per project"), xdist, "");
    line("`cdtester run`, first run (empty data folder)", runs[0].wall, "");
    let warm_label = format!("`cdtester run`, warm (2nd {:.2} s, 3rd {:.2} s)", runs[1].wall, runs[2].wall);
    line(&warm_label, warm, " (target: at most 0.50x)");
    let mut wrong: Vec<String> = seq_wrong.iter().map(|p| format!("pytest:{p}")).collect();
    for (i, r) in runs.iter().enumerate() {
        wrong.extend(r.wrong.iter().map(|p| format!("cdtester run {}:{p}", i + 1)));
    }
    if wrong.is_empty() {
        println!(
            "  counts: every project's per-module counts equal the seeded expectation (pytest and cdtester)"
        );
    } else {
        println!("  counts DIFFER: {}", wrong.join(", "));
    }
    wrong
}

fn print_memory(what: &str, run: &CdtRun) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let zygotes: Vec<String> = run.zygotes.values().map(|k| format!("{:.1} MiB", mib(*k))).collect();
    println!(
        "  memory, {what}: peak {:.1} MiB in at most {} processes (whole `cdtester run` tree; target at most 1 GiB); zygotes: {}",
        mib(run.peak_kib),
        run.peak_procs,
        if zygotes.is_empty() { "none".to_string() } else { zygotes.join(", ") }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_counts() {
        assert_eq!(summary_counts("....F\n3 failed, 97 passed in 0.41s\n"), (97, 3));
        assert_eq!(summary_counts("100 passed in 1.00s\n\n"), (100, 0));
        assert_eq!(summary_counts("== 2 failed, 1 passed, 1 warning in 0.1s =="), (1, 2));
        assert_eq!(summary_counts(""), (0, 0));
    }

    #[test]
    fn generation_is_deterministic_and_bugs_fail_where_expected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ea = generate(a.path(), 12, 3, "t").unwrap();
        assert_eq!(ea, generate(b.path(), 12, 3, "t").unwrap());
        for p in ea.keys() {
            for f in ["assignment.py", "tests/test_fizz.py"] {
                assert_eq!(
                    std::fs::read(a.path().join(p).join(f)).unwrap(),
                    std::fs::read(b.path().join(p).join(f)).unwrap()
                );
            }
        }
        let modules: Vec<&(u64, u64)> = ea.values().flat_map(|m| m.values()).collect();
        assert_eq!(modules.len(), 48);
        assert!(modules.iter().all(|(p, f)| p + f == 25));
        // Every bug's boundary inputs are among the tests, so a buggy function always fails some.
        assert!(modules.iter().any(|(_, f)| *f > 0) && modules.iter().any(|(_, f)| *f == 0));
        assert!(modules.iter().all(|(_, f)| *f == 0 || *f >= 2));
    }
}
