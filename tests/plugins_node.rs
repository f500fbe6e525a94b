//! The example policies and the native `unittest` runner inside a real `cdtester node`: a zip
//! with two projects submitted over HTTP; the weighted-grade policy grades one, the max-size
//! policy refuses the other with its reason, and a looping policy first in the chain is stopped
//! on every hook while the node keeps serving and the next policies decide.

mod common;
mod node_common;
mod plugins_common;

use std::time::Duration;

use plugins_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_applies_the_configured_policies_and_native_runner() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = wasm_examples();
    let lib = unittest_plugin();
    let mut toml = String::from(
        "[runner]\ndefault = \"unittest\"\n\n[[projects]]\npattern = \"*\"\npolicies = [\"loop\", \"max-size\", \"weighted-grade\"]\n\n\
         # A failing policy is skipped here (the default refuses the project).\n\
         [plugins]\nfail_closed = false\n\n",
    );
    for (name, file) in [("max-size", "max_size"), ("weighted-grade", "weighted_grade")] {
        let path = wasm.join(format!("{file}.wasm"));
        toml += &wasm_entry(name, &path, &sha256_file(&path));
    }
    let looping = test_wat("loop.wat");
    toml += &wasm_entry("loop", &looping, &sha256_file(&looping));
    toml += &unittest_entry(lib);
    let config = dir.path().join("cdtester.toml");
    std::fs::write(&config, toml).unwrap();

    let calc = dir.path().join("src/calc");
    write_files(&calc, GRADED_PROJECT);
    let big = dir.path().join("src/big");
    write_files(&big, GRADED_PROJECT);
    std::fs::write(big.join("data.bin"), noise(6 * 1024 * 1024)).unwrap();
    let zip = node_common::zip_projects(&[("calc", calc), ("big", big)]);

    let config_env = config.to_string_lossy().into_owned();
    let cluster = node_common::cluster(1, &dir.path().join("nodes"), &[("CDT_CONFIG", &config_env)]).await;
    let http = cluster.nodes[0].http;
    let id = node_common::submit_zip(http, &zip).await;
    let report = node_common::wait_finished(http, id, Duration::from_secs(120)).await;

    let calc = &report["projects"]["calc"];
    // weighted: passed 3 + 0.5 + 1 of graded 3 + 3 + 0.5 + 1 + 1 (the default would be 12.0)
    assert_eq!(calc["grade"], 10.59, "{report:#}");
    assert_eq!(calc["tests"]["passed"], 3, "{report:#}");
    assert_eq!(calc["tests"]["failed"], 1, "{report:#}");
    assert_eq!(calc["tests"]["error"], 1, "{report:#}");
    assert_eq!(calc["tests"]["skipped"], 1, "{report:#}");
    let big = &report["projects"]["big"];
    let error = big["error"].as_str().unwrap_or_default();
    assert!(error.contains("project is 6.00 MiB, over the 5 MiB limit"), "{report:#}");

    // The looping policy was asked first on each hook and stopped each time.
    let log = std::fs::read_to_string(&cluster.nodes[0].log).unwrap();
    for hook in ["admit", "select_runner", "grade"] {
        let stopped = format!("policy plugin loop, hook {hook}: ran out of fuel (50000000 units): stopped");
        assert!(log.contains(&stopped), "no {stopped:?} in the node log:\n{log}");
    }
}
