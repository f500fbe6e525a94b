//! Extension points of cdtester: WASM policy plugins and native runner plugins.
//!
//! # Using it from the node
//!
//! ```text
//! let policies = PolicySet::load(&config.plugins)?;            // once, at start (sha256, ABI checked)
//! let settings = config.project_settings(&name, url);           // runner, limits, policies from config
//! let meta = ProjectMeta::from_dir(&name, url, &root)?;         // or fill the fields from the zip
//! match policies.admit(&settings.policies, &meta).value { Admission::Reject { reason } => ..., _ => {} }
//! let choice = policies.select_runner(&settings.policies, &meta,
//!     RunnerChoice { runner: settings.runner, limits: settings.limits }).value;
//! ... run the project's tasks with runner `choice.runner` under `choice.limits` ...
//! let grade = policies.grade(&settings.policies, &name, &all_test_results).value;  // Option<f64>
//! let runner = load_native_runner(&config.plugins.native[0])?;  // the node's Registry does this
//! ```
//! Each chain helper returns a [`Decision`]: the value, the policy that decided (`None` when the
//! default applied) and the plugin failures met on the way (already logged with `tracing`). A
//! failing plugin never fails the chain: the next policy, then the default, applies. The
//! defaults are: the configured runner and limits; accept; [`cdtester_runner_api::Counts::grade`].
//! Calls are synchronous and bounded (fuel, 1 s wall clock, memory cap): a few hundred µs for
//! the examples, but a misbehaving plugin may use its whole deadline, so async code should call
//! them through `spawn_blocking`. Use `PolicySet::load_with(WasmHost::with_disk_cache(dir)?, ..)`
//! to keep compiled modules across restarts.
//!
//! # WASM policy ABI, version 1
//!
//! A policy plugin is a core WebAssembly module with **no imports** (policies get no host
//! functions: no filesystem, network or clock). It exports:
//! - a function named `cdt_policy_abi_v1` (any signature, never called): the ABI marker. A
//!   module exporting another `cdt_policy_abi_vN` is refused at load with a clear message;
//! - `memory`, its linear memory;
//! - `cdt_alloc(len: i32) -> i32`: returns a buffer of `len` bytes where the host writes the
//!   input;
//! - one or more hooks, each `(ptr: i32, len: i32) -> i64`, taking UTF-8 JSON input and
//!   returning `(out_ptr << 32) | out_len` of its UTF-8 JSON output in linear memory, or `0` for
//!   "no opinion" (the next policy in the project's chain is asked, then the default applies):
//!   - `cdt_select_runner`: in `{"project": META, "runner": "local", "limits": LIMITS}`, out
//!     `{"runner": "docker", "limits": {"timeout_s": 60}}` (both optional; limits is a partial
//!     override of the input limits);
//!   - `cdt_admit`: in `{"project": META}`, out `{"admit": false, "reason": "..."}`;
//!   - `cdt_grade`: in `{"project": "name", "tests": [{"nodeid", "outcome", "duration",
//!     "message"?}, ...]}`, out `{"grade": 13.5}` (0..20).
//!
//!   `META` is `{"name", "url": null|"...", "size_bytes", "file_count"}`; `LIMITS` is the
//!   `[runner.limits]` table; outcomes are the lowercase names of
//!   [`cdtester_runner_api::Outcome`]. Unknown output fields are errors.
//!
//! Every call gets a fresh instance in a fresh `Store`, with the plugin's fuel budget
//! (`plugins.wasm[].fuel`), a 1 s epoch deadline and a linear-memory cap
//! (`plugins.wasm[].memory_mb`; growing past it traps). A trap, running out of fuel or time,
//! hitting the memory cap, or bad output is reported as a [`PolicyError::Call`] and the fallback
//! applies. Compiled modules are cached in memory by the file's sha256 and, with
//! [`WasmHost::with_disk_cache`], on disk (`<sha256>-<engine>.cwasm`) across restarts.
//!
//! # Native runner plugins
//!
//! See [`cdtester_runner_api::abi`] for the C ABI. [`load_native_runner`] checks the file's
//! sha256 pin, loads the library (never unloaded), checks `cdt_runner_abi_version` and returns an
//! `Arc<dyn Runner>` that forwards every call across the ABI as JSON.

mod native;
mod pin;
mod policy;
mod wasm;

pub use native::{NativeError, NativeRunner, load_native_runner};
pub use pin::{PinError, read_pinned};
pub use policy::{Admission, Decision, PolicySet, ProjectMeta, RunnerChoice};
pub use wasm::{
    CacheStats, CallFailure, CallLimits, DEFAULT_DEADLINE, Hook, POLICY_ABI_VERSION, PolicyError,
    PolicyPlugin, WasmHost,
};
