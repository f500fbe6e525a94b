//! The versioned C ABI of native runner plugins (version 1).
//!
//! A native runner plugin is a shared library (`cdylib`) exporting three C functions:
//!
//! ```c
//! uint32_t cdt_runner_abi_version(void);      // must return RUNNER_ABI_VERSION; checked first
//! CdtBuf   cdt_runner_call(const uint8_t *method, size_t method_len,
//!                          const uint8_t *input, size_t input_len);
//! void     cdt_runner_free(CdtBuf buf);       // frees a buffer cdt_runner_call returned
//! ```
//!
//! `cdt_runner_call` takes a method name and its UTF-8 JSON input and returns a buffer owned by
//! the plugin holding the JSON [`Reply`] (`{"ok": ...}` or `{"err": {"kind", "message"}}`); the
//! host copies it and hands it back to `cdt_runner_free`. Methods mirror [`Runner`]:
//!
//! | method     | input                         | `ok` value         |
//! |------------|-------------------------------|--------------------|
//! | `name`     | `null`                        | the runner's name  |
//! | `prepare`  | [`ProjectSource`]             | [`PreparedProject`]|
//! | `discover` | [`PreparedProject`]           | module paths       |
//! | `run`      | [`RunRequest`]                | [`TaskReport`](crate::TaskReport) |
//! | `release`  | [`PreparedProject`]           | `null`             |
//!
//! The host never unloads a plugin library. Calls may come from several threads at once.
//! Plugins written in Rust get all of this from [`export_runner!`](crate::export_runner), which
//! also catches panics at the boundary and reports them as `{"err": {"kind": "panic"}}`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::{Limits, PreparedProject, ProjectSource, Runner, RunnerError, TaskSpec};

/// The ABI version this crate defines; a plugin reporting another one is refused.
pub const RUNNER_ABI_VERSION: u32 = 1;
/// Symbol names the host looks up.
pub const SYM_ABI_VERSION: &str = "cdt_runner_abi_version";
pub const SYM_CALL: &str = "cdt_runner_call";
pub const SYM_FREE: &str = "cdt_runner_free";

/// A byte buffer owned by the plugin (a Rust `Vec<u8>` taken apart, for Rust plugins).
#[repr(C)]
#[derive(Debug)]
pub struct CdtBuf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

pub type AbiVersionFn = unsafe extern "C" fn() -> u32;
pub type CallFn = unsafe extern "C" fn(*const u8, usize, *const u8, usize) -> CdtBuf;
pub type FreeFn = unsafe extern "C" fn(CdtBuf);

/// The input of method `run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub project: PreparedProject,
    pub task: TaskSpec,
    pub limits: Limits,
}

/// A [`RunnerError`] as it crosses the boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbiError {
    /// `no_tests`, `prepare`, `discover`, `infra`, `unknown_project`, `io`, `panic` or `bad_call`.
    pub kind: String,
    pub message: String,
}

/// What `cdt_runner_call` returns, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply<T> {
    Ok(T),
    Err(AbiError),
}

impl From<&RunnerError> for AbiError {
    fn from(e: &RunnerError) -> AbiError {
        let (kind, message) = match e {
            RunnerError::NoTests => ("no_tests", String::new()),
            RunnerError::Prepare(m) => ("prepare", m.clone()),
            RunnerError::Discover(m) => ("discover", m.clone()),
            RunnerError::Infra(m) => ("infra", m.clone()),
            RunnerError::UnknownProject(m) => ("unknown_project", m.clone()),
            RunnerError::Io(e) => ("io", e.to_string()),
        };
        AbiError { kind: kind.into(), message }
    }
}

impl From<AbiError> for RunnerError {
    fn from(e: AbiError) -> RunnerError {
        match e.kind.as_str() {
            "no_tests" => RunnerError::NoTests,
            "prepare" => RunnerError::Prepare(e.message),
            "discover" => RunnerError::Discover(e.message),
            "unknown_project" => RunnerError::UnknownProject(e.message),
            "io" => RunnerError::Io(std::io::Error::other(e.message)),
            "panic" => RunnerError::Infra(format!("runner plugin panicked: {}", e.message)),
            _ => RunnerError::Infra(e.message),
        }
    }
}

fn reply<T: Serialize>(r: Result<T, RunnerError>) -> Vec<u8> {
    let r = match r {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Err(AbiError::from(&e)),
    };
    // Serializing these plain data types cannot fail.
    serde_json::to_vec(&r).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(input: &[u8]) -> Result<T, RunnerError> {
    serde_json::from_slice(input).map_err(|e| RunnerError::Infra(format!("bad call input: {e}")))
}

/// Plugin side: runs one method on `runner` and encodes the reply.
pub fn dispatch(runner: &dyn Runner, method: &str, input: &[u8]) -> Vec<u8> {
    match method {
        "name" => reply(Ok(runner.name())),
        "prepare" => reply(decode::<ProjectSource>(input).and_then(|s| runner.prepare(&s))),
        "discover" => reply(decode::<PreparedProject>(input).and_then(|p| runner.discover(&p))),
        "run" => reply(decode::<RunRequest>(input).and_then(|r| runner.run(&r.project, &r.task, &r.limits))),
        "release" => reply(decode::<PreparedProject>(input).map(|p| runner.release(&p))),
        other => serde_json::to_vec(&Reply::<()>::Err(AbiError {
            kind: "bad_call".into(),
            message: format!("unknown method {other:?}"),
        }))
        .unwrap_or_default(),
    }
}

fn into_buf(v: Vec<u8>) -> CdtBuf {
    let mut v = std::mem::ManuallyDrop::new(v);
    CdtBuf { ptr: v.as_mut_ptr(), len: v.len(), cap: v.capacity() }
}

/// Plugin side of `cdt_runner_call` (used by [`export_runner!`](crate::export_runner)): builds the
/// runner on first use, dispatches, and turns any panic into an error reply.
///
/// # Safety
/// `method`/`input` must point to `method_len`/`input_len` readable bytes (or be dangling with
/// length 0).
pub unsafe fn plugin_call(
    cell: &OnceLock<Box<dyn Runner>>,
    make: fn() -> Box<dyn Runner>,
    method: *const u8,
    method_len: usize,
    input: *const u8,
    input_len: usize,
) -> CdtBuf {
    // SAFETY: the caller guarantees both ranges are readable.
    let (method, input) = unsafe { (bytes(method, method_len), bytes(input, input_len)) };
    let out = catch_unwind(AssertUnwindSafe(|| {
        let runner = cell.get_or_init(make);
        dispatch(runner.as_ref(), &String::from_utf8_lossy(method), input)
    }))
    .unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        serde_json::to_vec(&Reply::<()>::Err(AbiError { kind: "panic".into(), message })).unwrap_or_default()
    });
    into_buf(out)
}

unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: guaranteed by plugin_call's caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

/// Plugin side of `cdt_runner_free`.
///
/// # Safety
/// `buf` must come from [`plugin_call`] of the same library and be freed once.
pub unsafe fn plugin_free(buf: CdtBuf) {
    if !buf.ptr.is_null() {
        // SAFETY: `buf` is a Vec taken apart by `into_buf`.
        drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
    }
}

/// Exports a [`Runner`] from a `cdylib` as a native runner plugin:
/// `cdtester_runner_api::export_runner!(MyRunner::new);` where `MyRunner::new() -> MyRunner`.
/// The runner is built on the first call.
#[macro_export]
macro_rules! export_runner {
    ($make:expr) => {
        static CDT_RUNNER: ::std::sync::OnceLock<::std::boxed::Box<dyn $crate::Runner>> =
            ::std::sync::OnceLock::new();

        fn cdt_make_runner() -> ::std::boxed::Box<dyn $crate::Runner> {
            ::std::boxed::Box::new($make())
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn cdt_runner_abi_version() -> u32 {
            $crate::abi::RUNNER_ABI_VERSION
        }

        /// # Safety
        /// See [`cdtester_runner_api::abi`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn cdt_runner_call(
            method: *const u8,
            method_len: usize,
            input: *const u8,
            input_len: usize,
        ) -> $crate::abi::CdtBuf {
            // SAFETY: forwarded from the host, which passes valid ranges.
            unsafe {
                $crate::abi::plugin_call(&CDT_RUNNER, cdt_make_runner, method, method_len, input, input_len)
            }
        }

        /// # Safety
        /// `buf` must come from `cdt_runner_call` and be freed once.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn cdt_runner_free(buf: $crate::abi::CdtBuf) {
            // SAFETY: forwarded from the host.
            unsafe { $crate::abi::plugin_free(buf) }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModuleReport, TaskReport, TestResult};

    struct Fake;

    impl Runner for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn prepare(&self, s: &ProjectSource) -> Result<PreparedProject, RunnerError> {
            if s.name == "boom" {
                panic!("prepare exploded");
            }
            Ok(PreparedProject {
                id: s.id.clone(),
                name: s.name.clone(),
                root: s.root.clone(),
                content_hash: "h".into(),
            })
        }
        fn discover(&self, _: &PreparedProject) -> Result<Vec<String>, RunnerError> {
            Err(RunnerError::NoTests)
        }
        fn run(&self, _: &PreparedProject, task: &TaskSpec, _: &Limits) -> Result<TaskReport, RunnerError> {
            let tests = vec![TestResult {
                nodeid: format!("{}::t", task.modules[0]),
                outcome: crate::Outcome::Passed,
                duration: 0.0,
                message: None,
                attempts: Vec::new(),
            }];
            Ok(TaskReport {
                modules: vec![ModuleReport {
                    module: task.modules[0].clone(),
                    tests,
                    duration: 0.0,
                    note: None,
                    output: None,
                    output_truncated: false,
                }],
            })
        }
        fn release(&self, _: &PreparedProject) {}
    }

    static CELL: OnceLock<Box<dyn Runner>> = OnceLock::new();

    fn call(method: &str, input: &[u8]) -> serde_json::Value {
        let buf = unsafe {
            plugin_call(&CELL, || Box::new(Fake), method.as_ptr(), method.len(), input.as_ptr(), input.len())
        };
        let v = serde_json::from_slice(unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }).unwrap();
        unsafe { plugin_free(buf) };
        v
    }

    #[test]
    fn methods_round_trip_and_errors_and_panics_become_replies() {
        assert_eq!(call("name", b"null"), serde_json::json!({"ok": "fake"}));
        let src = serde_json::json!({"id": "1", "name": "p", "root": "/tmp/p"}).to_string();
        assert_eq!(call("prepare", src.as_bytes())["ok"]["content_hash"], "h");
        let err: Reply<()> = serde_json::from_value(call(
            "discover",
            br#"{"id":"1","name":"p","root":"/","content_hash":"h"}"#,
        ))
        .unwrap();
        let Reply::Err(e) = err else { panic!("expected an error") };
        assert!(matches!(RunnerError::from(e), RunnerError::NoTests));
        let boom = serde_json::json!({"id": "1", "name": "boom", "root": "/"}).to_string();
        assert_eq!(
            call("prepare", boom.as_bytes()),
            serde_json::json!({"err": {"kind": "panic", "message": "prepare exploded"}})
        );
        assert_eq!(call("prepare", b"{not json")["err"]["kind"], "infra");
        assert_eq!(call("frobnicate", b"null")["err"]["kind"], "bad_call");
        let run = RunRequest {
            project: PreparedProject {
                id: "1".into(),
                name: "p".into(),
                root: "/".into(),
                content_hash: "h".into(),
            },
            task: TaskSpec::new("t", vec!["test_a.py".into()]),
            limits: Limits::default(),
        };
        let reply: Reply<TaskReport> =
            serde_json::from_value(call("run", &serde_json::to_vec(&run).unwrap())).unwrap();
        let Reply::Ok(report) = reply else { panic!("expected a report") };
        assert_eq!(report.modules[0].tests[0].nodeid, "test_a.py::t");
    }
}
