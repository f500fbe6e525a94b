//! `cdtester bench plugins`: WASM policy plugin costs — module load time (compile, from the disk
//! cache, from the in-memory cache) and per-call latency (fresh store + instance, fuel,
//! epoch deadline, memory cap, JSON in and out) for each example policy's hook.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cdtester_plugins::{CallLimits, DEFAULT_DEADLINE, PolicyPlugin, ProjectMeta, RunnerChoice, WasmHost};
use cdtester_runner_api::{Limits, Outcome, TestResult};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Folder with the built example policies (plugins/examples/wasm/build.sh writes them there).
    #[arg(long, default_value = "plugins/examples/wasm")]
    pub wasm_dir: PathBuf,
    /// Calls measured per hook.
    #[arg(long, default_value_t = 2000)]
    pub calls: usize,
    /// Cold loads measured per plugin (each in a new host, so nothing is cached).
    #[arg(long, default_value_t = 10)]
    pub loads: usize,
    /// Tests in the `grade` input.
    #[arg(long, default_value_t = 100)]
    pub tests: usize,
}

const EXAMPLES: [&str; 3] = ["untrusted_to_docker", "max_size", "weighted_grade"];

fn limits() -> CallLimits {
    CallLimits { fuel: 50_000_000, memory_mb: 16, deadline: DEFAULT_DEADLINE }
}

fn human(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 { format!("{:.2} ms", us / 1000.0) } else { format!("{us:.1} µs") }
}

fn stats(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:>10}  p99 {:>10}  max {:>10}",
        human(super::percentile(&samples, 0.5)),
        human(super::percentile(&samples, 0.99)),
        human(*samples.last().unwrap_or(&Duration::ZERO))
    )
}

/// Times `f` `n` times.
fn sample(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<Duration>> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed())
        })
        .collect()
}

fn call_once(plugin: &PolicyPlugin, meta: &ProjectMeta, tests: &[TestResult]) -> anyhow::Result<()> {
    let configured = RunnerChoice { runner: "local".into(), limits: Limits::default() };
    match plugin.hooks().first() {
        Some(cdtester_plugins::Hook::SelectRunner) => plugin.select_runner(meta, &configured).map(drop)?,
        Some(cdtester_plugins::Hook::Admit) => plugin.admit(meta).map(drop)?,
        Some(cdtester_plugins::Hook::Grade) => plugin.grade("bench", tests).map(drop)?,
        None => bail!("plugin {} exports no hook", plugin.name()),
    }
    Ok(())
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.calls == 0 || args.loads == 0 {
        bail!("--calls and --loads must be at least 1");
    }
    let files: Vec<(String, Vec<u8>)> = EXAMPLES
        .iter()
        .map(|name| {
            let path = args.wasm_dir.join(format!("{name}.wasm"));
            std::fs::read(&path)
                .with_context(|| {
                    format!("reading {} (build it with plugins/examples/wasm/build.sh)", path.display())
                })
                .map(|bytes| (name.to_string(), bytes))
        })
        .collect::<anyhow::Result<_>>()?;
    // Untrusted URL and 10 MiB: every hook has an opinion, so the output path is measured too.
    let meta = ProjectMeta {
        name: "bench".into(),
        url: Some("https://github.com/someone/bench".into()),
        size_bytes: 10 << 20,
        file_count: 40,
    };
    let outcomes = [Outcome::Passed, Outcome::Failed, Outcome::Skipped, Outcome::Error];
    let tests: Vec<TestResult> = (0..args.tests)
        .map(|i| TestResult {
            nodeid: format!("tests/test_mod{}.py::TestX::test_core_{i}", i % 7),
            outcome: outcomes[i % outcomes.len()],
            duration: 0.01,
            message: (i % 4 == 1).then(|| "AssertionError: 1 != 2".into()),
            attempts: Vec::new(),
        })
        .collect();

    println!(
        "WASM policy plugins: fuel 50000000, memory cap 16 MiB, deadline {} ms",
        DEFAULT_DEADLINE.as_millis()
    );
    println!("module load (sha256 + compile or cache + ABI check), {} samples each:", args.loads);
    let disk = tempfile::tempdir().context("temporary directory for the disk cache")?;
    for (name, bytes) in &files {
        // Each sample in a new host (created outside the timer), so only the wanted cache exists.
        let timed_load = |host: WasmHost| -> anyhow::Result<Duration> {
            let start = Instant::now();
            host.load_bytes(name, bytes, limits())?;
            Ok(start.elapsed())
        };
        let cold =
            (0..args.loads).map(|_| timed_load(WasmHost::new()?)).collect::<anyhow::Result<Vec<_>>>()?;
        WasmHost::with_disk_cache(disk.path())?.load_bytes(name, bytes, limits())?;
        let from_disk = (0..args.loads)
            .map(|_| timed_load(WasmHost::with_disk_cache(disk.path())?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let host = WasmHost::new()?;
        host.load_bytes(name, bytes, limits())?;
        let in_memory = sample(args.loads.max(100), || {
            host.load_bytes(name, bytes, limits())?;
            Ok(())
        })?;
        println!("  {name:<20} compile      {}", stats(cold));
        println!("  {name:<20} disk cache   {}", stats(from_disk));
        println!("  {name:<20} memory cache {}", stats(in_memory));
    }
    println!(
        "per call (fresh store + instance, JSON in/out), {} calls each, grade input {} tests:",
        args.calls, args.tests
    );
    let host = WasmHost::new()?;
    for (name, bytes) in &files {
        let plugin = host.load_bytes(name, bytes, limits())?;
        call_once(&plugin, &meta, &tests)?; // warm-up
        let calls = sample(args.calls, || call_once(&plugin, &meta, &tests))?;
        let hook = plugin.hooks().first().map(|h| h.as_str()).unwrap_or("-");
        println!("  {name:<20} {hook:<14}{}", stats(calls));
    }
    stop_latency(&host)?;
    Ok(())
}

/// How long a looping plugin runs before it is stopped, by fuel and by the deadline.
fn stop_latency(host: &WasmHost) -> anyhow::Result<()> {
    const LOOP: &str = r#"(module (memory (export "memory") 1) (func (export "cdt_policy_abi_v1"))
        (func (export "cdt_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "cdt_grade") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0)))"#;
    let by_fuel = host.load_bytes("loop", LOOP.as_bytes(), limits())?;
    let by_deadline = host.load_bytes(
        "loop",
        LOOP.as_bytes(),
        CallLimits { fuel: u64::MAX / 2, deadline: Duration::from_millis(100), ..limits() },
    )?;
    for (what, plugin) in [("fuel 50000000", &by_fuel), ("deadline 100 ms", &by_deadline)] {
        let start = Instant::now();
        let err = match plugin.call(cdtester_plugins::Hook::Grade, b"{}") {
            Ok(_) => bail!("the looping plugin returned"),
            Err(e) => e,
        };
        println!(
            "looping plugin stopped by {what} after {:.1} ms: {err}",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
