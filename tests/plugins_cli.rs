//! `cdtester plugins list|check` against config files naming the example plugins.

mod plugins_common;

use std::path::Path;
use std::process::{Command, Output};

use plugins_common::*;

fn cdtester(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdtester"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("CDT_LOG", "warn")
        .output()
        .expect("running cdtester")
}

#[test]
fn check_passes_on_good_plugins_and_lists_their_smoke_answers() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wasm_examples();
    let lib = unittest_plugin();
    let mut toml =
        String::from("[[projects]]\npattern = \"*\"\npolicies = [\"max-size\", \"weighted-grade\"]\n\n");
    for (name, file) in [
        ("untrusted-to-docker", "untrusted_to_docker"),
        ("max-size", "max_size"),
        ("weighted-grade", "weighted_grade"),
    ] {
        let path = wasm.join(format!("{file}.wasm"));
        toml += &wasm_entry(name, &path, &sha256_file(&path));
    }
    toml += &unittest_entry(lib);
    let config = dir.path().join("cdtester.toml");
    std::fs::write(&config, toml).unwrap();

    let out = cdtester(&config, &["plugins", "check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok     wasm untrusted-to-docker: sha256 ok, policy ABI v1, hooks select_runner; select_runner -> runner docker (timeout 60 s, memory 512 MiB)"), "{stdout}");
    assert!(
        stdout.contains("ok     wasm max-size: sha256 ok, policy ABI v1, hooks admit; admit -> no opinion"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok     wasm weighted-grade: sha256 ok, policy ABI v1, hooks grade; grade -> 13.33"),
        "{stdout}"
    );
    assert!(stdout.contains("ok     native unittest: sha256 ok, runner ABI v1, runner unittest; prepare + discover of an empty project -> no tests"), "{stdout}");
    assert!(stdout.contains("4 plugin(s) checked, all ok"), "{stdout}");

    let out = cdtester(&config, &["plugins", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("wasm   max-size"), "{stdout}");
    assert!(stdout.contains("fuel 50000000, memory 16 MiB; sha256 ok"), "{stdout}");
    assert!(stdout.contains("used by project rules: *"), "{stdout}");
    assert!(stdout.contains("native unittest"), "{stdout}");
}

#[test]
fn check_fails_naming_each_bad_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let good = wasm_examples().join("max_size.wasm");
    let future = test_wat("wrong_abi.wat");
    let looping = test_wat("loop.wat");
    let mut toml = String::from("[[projects]]\npattern = \"x*\"\npolicies = [\"nonexistent\"]\n\n");
    toml += &wasm_entry("tampered", &good, &"0".repeat(64));
    toml += &wasm_entry("future", &future, &sha256_file(&future));
    toml += &wasm_entry("looping", &looping, &sha256_file(&looping));
    let config = dir.path().join("cdtester.toml");
    std::fs::write(&config, toml).unwrap();

    let out = cdtester(&config, &["plugins", "check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stdout.contains("FAILED wasm tampered: policy plugin tampered: plugin file"), "{stdout}");
    assert!(stdout.contains("but the configuration pins 0000"), "{stdout}");
    assert!(
        stdout
            .contains("FAILED wasm future: policy plugin future: speaks policy ABI v2, this host speaks v1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAILED wasm looping: policy plugin looping, hook select_runner: ran out of fuel"),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED rule projects[0] (x*): names policy \"nonexistent\""), "{stdout}");
    assert!(stderr.contains("4 plugin check(s) failed"), "{stderr}");

    let out = cdtester(&config, &["plugins", "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("but the configuration pins 0000"), "{stdout}");
}

#[test]
fn run_uses_the_native_unittest_runner_selected_by_config() {
    let dir = tempfile::tempdir().unwrap();
    let lib = unittest_plugin();
    let toml = format!(
        "[node]\ndata_dir = \"{}\"\n[runner]\ndefault = \"unittest\"\n{}",
        dir.path().join("data").display(),
        unittest_entry(lib)
    );
    let config = dir.path().join("cdtester.toml");
    std::fs::write(&config, toml).unwrap();
    let project = dir.path().join("calc");
    write_files(&project, GRADED_PROJECT);

    let out = cdtester(&config, &["run", project.to_str().unwrap(), "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let p = v["projects"].as_object().and_then(|m| m.values().next()).unwrap();
    assert_eq!(p["runner"], "unittest", "{v:#}");
    let tests =
        p["modules"].as_object().and_then(|m| m.values().next()).unwrap()["tests"].as_array().unwrap();
    let outcome = |name: &str| {
        tests.iter().find(|t| t["nodeid"].as_str().unwrap().ends_with(name)).map(|t| t["outcome"].clone())
    };
    assert_eq!(outcome("::test_core_add"), Some("passed".into()));
    assert_eq!(outcome("::test_core_sub"), Some("failed".into()));
    assert_eq!(outcome("::test_broken"), Some("error".into()));
    assert_eq!(outcome("::test_skipped"), Some("skipped".into()));
    assert_eq!(tests.len(), 6);
    assert_eq!(p["grade"], 12.0, "no policies: the default grade");
}

#[test]
fn run_applies_the_project_rules_policies() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wasm_examples();
    let lib = unittest_plugin();
    let mut toml = format!(
        "[node]\ndata_dir = \"{}\"\n[runner]\ndefault = \"unittest\"\n\n[[projects]]\npattern = \"*\"\npolicies = [\"max-size\", \"weighted-grade\"]\n\n{}",
        dir.path().join("data").display(),
        unittest_entry(lib)
    );
    for (name, file) in [("max-size", "max_size"), ("weighted-grade", "weighted_grade")] {
        let path = wasm.join(format!("{file}.wasm"));
        toml += &wasm_entry(name, &path, &sha256_file(&path));
    }
    let config = dir.path().join("cdtester.toml");
    std::fs::write(&config, toml).unwrap();
    let projects = dir.path().join("projects");
    write_files(&projects.join("calc"), GRADED_PROJECT);
    write_files(&projects.join("big"), GRADED_PROJECT);
    // Incompressible bytes: over the max-size policy's 5 MiB.
    std::fs::write(projects.join("big/data.bin"), noise(6 * 1024 * 1024)).unwrap();

    let out = cdtester(&config, &["run", projects.to_str().unwrap(), "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Exit 2: one project (big) could not be evaluated.
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let project = |name: &str| v["projects"][name].clone();
    // weighted: passed 3 + 0.5 + 1 of graded 3 + 3 + 0.5 + 1 + 1 (the default would be 12.0)
    assert_eq!(project("calc")["grade"], 10.59, "{v:#}");
    let error = project("big")["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("refused by policy") && error.contains("over the 5 MiB limit"), "{v:#}");
}
