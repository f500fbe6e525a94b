//! `cdtester plugins list` and `cdtester plugins check`: what plugins the configuration names,
//! and whether each one loads (sha256 pin, ABI version) and answers a smoke call.

use std::time::Instant;

use cdtester_config::Config;
use cdtester_plugins::{
    Admission, Hook, PolicyPlugin, ProjectMeta, RunnerChoice, WasmHost, load_native_runner, read_pinned,
};
use cdtester_runner_api::{Outcome, ProjectSource, Runner, RunnerError, TestResult};

#[derive(clap::Subcommand, Debug)]
pub enum PluginsCommand {
    /// List the configured WASM policy and native runner plugins, whether each file matches its
    /// sha256 pin, and which project rules use each policy.
    List,
    /// Load every configured plugin (pin, ABI version), make a smoke call to each hook or runner,
    /// and check that every policy a project rule names is configured. Fails if anything fails.
    Check,
}

pub fn run(cmd: PluginsCommand, config: &Config) -> anyhow::Result<()> {
    match cmd {
        PluginsCommand::List => {
            list(config);
            Ok(())
        }
        PluginsCommand::Check => check(config),
    }
}

fn pin_status(path: &std::path::Path, sha256: &str) -> String {
    match read_pinned(path, sha256) {
        Ok(_) => "sha256 ok".into(),
        Err(e) => e.to_string(),
    }
}

fn list(config: &Config) {
    let plugins = &config.plugins;
    if plugins.wasm.is_empty() && plugins.native.is_empty() {
        println!("no plugins configured ([[plugins.wasm]], [[plugins.native]])");
        return;
    }
    for p in &plugins.wasm {
        let users: Vec<&str> = config
            .projects
            .iter()
            .filter(|r| r.policies.contains(&p.name))
            .map(|r| r.pattern.as_str())
            .collect();
        println!("wasm   {}  {}", p.name, p.path.display());
        println!("       fuel {}, memory {} MiB; {}", p.fuel, p.memory_mb, pin_status(&p.path, &p.sha256));
        println!(
            "       used by project rules: {}",
            if users.is_empty() { "none".into() } else { users.join(", ") }
        );
    }
    for p in &plugins.native {
        println!("native {}  {}", p.name, p.path.display());
        println!("       {}", pin_status(&p.path, &p.sha256));
    }
}

/// A smoke call of every hook the plugin exports, with sample input.
fn smoke_policy(plugin: &PolicyPlugin, config: &Config) -> Result<String, String> {
    let meta = ProjectMeta {
        name: "smoke".into(),
        url: Some("https://example.invalid/smoke.git".into()),
        size_bytes: 4096,
        file_count: 3,
    };
    let tests: Vec<TestResult> = [Outcome::Passed, Outcome::Passed, Outcome::Failed, Outcome::Skipped]
        .into_iter()
        .enumerate()
        .map(|(i, outcome)| TestResult {
            nodeid: format!("tests/test_smoke.py::test_{i}"),
            outcome,
            duration: 0.01,
            message: None,
            attempts: Vec::new(),
        })
        .collect();
    let mut said = Vec::new();
    for hook in plugin.hooks() {
        let start = Instant::now();
        let answer = match hook {
            Hook::SelectRunner => {
                let configured = RunnerChoice {
                    runner: config.runner.default.clone(),
                    limits: config.runner.limits.clone(),
                };
                plugin.select_runner(&meta, &configured).map(|c| match c {
                    None => "no opinion".to_string(),
                    Some(c) => format!(
                        "runner {} (timeout {} s, memory {} MiB)",
                        c.runner, c.limits.timeout_s, c.limits.memory_mb
                    ),
                })
            }
            Hook::Admit => plugin.admit(&meta).map(|a| match a {
                None => "no opinion".to_string(),
                Some(Admission::Accept) => "accept".to_string(),
                Some(Admission::Reject { reason }) => format!("reject ({reason})"),
            }),
            Hook::Grade => plugin.grade("smoke", &tests).map(|g| match g {
                None => "no opinion".to_string(),
                Some(g) => format!("{g}"),
            }),
        }
        .map_err(|e| e.to_string())?;
        said.push(format!("{hook} -> {answer} ({:.2} ms)", start.elapsed().as_secs_f64() * 1e3));
    }
    Ok(said.join("; "))
}

/// A smoke call of a native runner: prepare and discover an empty project (must say "no tests").
fn smoke_runner(runner: &dyn Runner) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let source = ProjectSource {
        id: "smoke".into(),
        name: "smoke".into(),
        root: dir.path().into(),
        extra_requirements: vec![],
    };
    let prepared = runner.prepare(&source).map_err(|e| format!("prepare of an empty project: {e}"))?;
    let result = runner.discover(&prepared);
    runner.release(&prepared);
    match result {
        Err(RunnerError::NoTests) => {
            Ok("prepare + discover of an empty project -> no tests, as expected".into())
        }
        Ok(m) => Err(format!("discover found modules {m:?} in an empty project")),
        Err(e) => Err(format!("discover of an empty project: {e}")),
    }
}

fn check(config: &Config) -> anyhow::Result<()> {
    let mut failures = 0usize;
    let mut report = |kind: &str, name: &str, result: Result<String, String>| match result {
        Ok(msg) => println!("ok     {kind} {name}: {msg}"),
        Err(msg) => {
            failures += 1;
            println!("FAILED {kind} {name}: {msg}");
        }
    };
    let host = WasmHost::new()?;
    for p in &config.plugins.wasm {
        let result = host.load_configured(p).map_err(|e| e.to_string()).and_then(|plugin| {
            let hooks: Vec<&str> = plugin.hooks().iter().map(|h| h.as_str()).collect();
            let smoke = smoke_policy(&plugin, config)?;
            Ok(format!(
                "sha256 ok, policy ABI v{}, hooks {}; {smoke}",
                cdtester_plugins::POLICY_ABI_VERSION,
                hooks.join(",")
            ))
        });
        report("wasm", &p.name, result);
    }
    for p in &config.plugins.native {
        let result = load_native_runner(p).map_err(|e| e.to_string()).and_then(|runner| {
            let smoke = smoke_runner(&runner)?;
            Ok(format!(
                "sha256 ok, runner ABI v{}, runner {}; {smoke}",
                cdtester_runner_api::abi::RUNNER_ABI_VERSION,
                runner.name()
            ))
        });
        report("native", &p.name, result);
    }
    for (i, rule) in config.projects.iter().enumerate() {
        for policy in &rule.policies {
            if !config.plugins.wasm.iter().any(|p| &p.name == policy) {
                report(
                    "rule",
                    &format!("projects[{i}] ({})", rule.pattern),
                    Err(format!("names policy {policy:?}, which no [[plugins.wasm]] entry defines")),
                );
            }
        }
    }
    let total = config.plugins.wasm.len() + config.plugins.native.len();
    if failures > 0 {
        anyhow::bail!("{failures} plugin check(s) failed");
    }
    println!("{total} plugin(s) checked, all ok");
    Ok(())
}
