//! The WASM policy host: one wasmtime [`Engine`] with fuel metering and epoch interruption, a
//! compiled-module cache keyed by the file's sha256, and per-call sandboxes (a fresh [`Store`]
//! per call with a fuel budget, a wall-clock epoch deadline and a linear-memory cap).
//!
//! The guest ABI (version 1) is described in the crate documentation and in plugins/README.md.

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cdtester_config::WasmPluginConfig;
use wasmtime::{Engine, ExternType, Instance, Module, ResourceLimiter, Store, Trap, ValType};

use crate::pin::{self, PinError};

/// The policy ABI version this host speaks. A module declares the version it was written for by
/// exporting a function named `cdt_policy_abi_v<N>`; only `N == POLICY_ABI_VERSION` is accepted.
pub const POLICY_ABI_VERSION: u32 = 1;
const ABI_MARKER_PREFIX: &str = "cdt_policy_abi_v";
/// Largest output a hook may return.
const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Period of the epoch ticker; deadlines are rounded up to whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Default wall-clock deadline of one hook call (on top of the fuel budget, which bounds
/// instructions but not e.g. one large `memory.fill`).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(1000);

/// A policy hook a plugin may export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    SelectRunner,
    Admit,
    Grade,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::SelectRunner, Hook::Admit, Hook::Grade];

    /// The function the guest exports for this hook.
    pub fn export_name(self) -> &'static str {
        match self {
            Hook::SelectRunner => "cdt_select_runner",
            Hook::Admit => "cdt_admit",
            Hook::Grade => "cdt_grade",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::SelectRunner => "select_runner",
            Hook::Admit => "admit",
            Hook::Grade => "grade",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one hook call failed. The caller then applies its fallback.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallFailure {
    #[error("ran out of fuel ({fuel} units): stopped")]
    OutOfFuel { fuel: u64 },
    #[error("exceeded its {ms} ms deadline: stopped")]
    Deadline { ms: u128 },
    #[error("asked for more than its {mb} MiB memory cap: stopped")]
    MemoryCap { mb: u64 },
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned bad output: {0}")]
    BadOutput(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy plugin {name}: {source}")]
    Pin { name: String, source: PinError },
    #[error("policy plugin {name}: not valid WebAssembly: {message}")]
    Compile { name: String, message: String },
    #[error("policy plugin {name}: not a cdtester policy plugin: {why}")]
    NotAPolicy { name: String, why: String },
    #[error(
        "policy plugin {name}: speaks policy ABI v{found}, this host speaks v{POLICY_ABI_VERSION}: refusing to load it"
    )]
    AbiVersion { name: String, found: String },
    #[error("policy {0} is named by a project rule but no [[plugins.wasm]] entry defines it")]
    Unknown(String),
    #[error("policy plugin {name}, hook {hook}: {failure}")]
    Call { name: String, hook: Hook, failure: CallFailure },
    #[error("wasmtime engine: {0}")]
    Engine(String),
}

/// Per-call resource budget of one plugin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallLimits {
    /// Fuel (about one unit per WebAssembly instruction).
    pub fuel: u64,
    /// Linear memory cap, MiB.
    pub memory_mb: u64,
    /// Wall-clock deadline, enforced by epoch interruption.
    pub deadline: Duration,
}

/// How module loads were served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Compiled from the WebAssembly.
    pub compiled: u64,
    /// Deserialized from the disk cache.
    pub disk_hits: u64,
    /// Found compiled in memory.
    pub memory_hits: u64,
}

/// Compiles and caches policy modules and runs their calls. Cheap to clone (shared state).
#[derive(Clone)]
pub struct WasmHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    engine: Engine,
    /// Compiled modules by the sha256 of their file.
    cache: Mutex<HashMap<String, Module>>,
    /// On-disk cache: directory and engine compatibility hash.
    disk: Option<(PathBuf, String)>,
    stats: Mutex<CacheStats>,
    ticker: OnceLock<()>,
    stop: Arc<AtomicBool>,
}

impl Drop for HostInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl WasmHost {
    /// A host caching compiled modules in memory only.
    pub fn new() -> Result<WasmHost, PolicyError> {
        Self::build(None)
    }

    /// A host that also keeps compiled modules in `dir` (`<sha256>-<engine>.cwasm`), so a
    /// restarted node skips compilation. The directory must be as trusted as the binary: its
    /// files are loaded as native code.
    pub fn with_disk_cache(dir: &Path) -> Result<WasmHost, PolicyError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| PolicyError::Engine(format!("module cache {}: {e}", dir.display())))?;
        Self::build(Some(dir.to_path_buf()))
    }

    fn build(disk: Option<PathBuf>) -> Result<WasmHost, PolicyError> {
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| PolicyError::Engine(e.to_string()))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(WasmHost {
            inner: Arc::new(HostInner {
                engine,
                cache: Mutex::new(HashMap::new()),
                disk: disk.map(|dir| (dir, format!("{:016x}", hasher.finish()))),
                stats: Mutex::new(CacheStats::default()),
                ticker: OnceLock::new(),
                stop: Arc::new(AtomicBool::new(false)),
            }),
        })
    }

    /// Compiles `bytes`, or deserializes them from the disk cache when there is one.
    fn compile(&self, name: &str, sha: &str, bytes: &[u8]) -> Result<(Module, bool), PolicyError> {
        let engine = &self.inner.engine;
        let file =
            self.inner.disk.as_ref().map(|(dir, engine_hash)| dir.join(format!("{sha}-{engine_hash}.cwasm")));
        if let Some(data) = file.as_ref().and_then(|f| std::fs::read(f).ok()) {
            // SAFETY: the file is one this host wrote with `Module::serialize` for an engine with
            // the same compatibility hash, in a directory as trusted as the binary (see
            // `with_disk_cache`); wasmtime still checks its version and configuration.
            match unsafe { Module::deserialize(engine, &data) } {
                Ok(m) => return Ok((m, true)),
                Err(e) => tracing::warn!("policy plugin {name}: ignoring cached module: {e}"),
            }
        }
        let module = Module::new(engine, bytes)
            .map_err(|e| PolicyError::Compile { name: name.into(), message: format!("{e:#}") })?;
        if let Some(file) = file {
            let tmp = file.with_extension(format!("tmp{}", std::process::id()));
            let written = module
                .serialize()
                .map_err(|e| e.to_string())
                .and_then(|data| std::fs::write(&tmp, data).map_err(|e| e.to_string()))
                .and_then(|()| std::fs::rename(&tmp, &file).map_err(|e| e.to_string()));
            if let Err(e) = written {
                tracing::warn!(
                    "policy plugin {name}: cannot cache the compiled module in {}: {e}",
                    file.display()
                );
            }
        }
        Ok((module, false))
    }

    /// How loads were served so far.
    pub fn stats(&self) -> CacheStats {
        *self.inner.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the epoch ticker thread (once, when the first plugin loads). It stops when the
    /// host is dropped.
    fn start_ticker(&self) {
        self.inner.ticker.get_or_init(|| {
            let engine = self.inner.engine.clone();
            let stop = self.inner.stop.clone();
            std::thread::Builder::new()
                .name("cdt-wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map(drop)
                .unwrap_or_else(|e| tracing::error!("cannot start the WASM epoch ticker: {e}"));
        });
    }

    /// Loads a `[[plugins.wasm]]` entry: sha256 pin, compile (or cache hit), ABI check, with the
    /// entry's fuel and memory cap and the default deadline.
    pub fn load_configured(&self, config: &WasmPluginConfig) -> Result<PolicyPlugin, PolicyError> {
        let limits =
            CallLimits { fuel: config.fuel, memory_mb: config.memory_mb, deadline: DEFAULT_DEADLINE };
        self.load_file(&config.name, &config.path, &config.sha256, limits)
    }

    /// Loads a plugin file after checking its sha256 pin.
    pub fn load_file(
        &self,
        name: &str,
        path: &Path,
        sha256: &str,
        limits: CallLimits,
    ) -> Result<PolicyPlugin, PolicyError> {
        let bytes = pin::read_pinned(path, sha256)
            .map_err(|source| PolicyError::Pin { name: name.into(), source })?;
        self.load_bytes(name, &bytes, limits)
    }

    /// Loads a plugin from its bytes (binary WebAssembly or text), compiling it unless a module
    /// with the same sha256 is cached, and checks its ABI.
    pub fn load_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        limits: CallLimits,
    ) -> Result<PolicyPlugin, PolicyError> {
        let sha = cdtester_runner_api::sha256_hex(bytes);
        let module = {
            let mut cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            let mut stats = self.inner.stats.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(&sha) {
                Some(m) => {
                    stats.memory_hits += 1;
                    m.clone()
                }
                None => {
                    let (m, from_disk) = self.compile(name, &sha, bytes)?;
                    *(if from_disk { &mut stats.disk_hits } else { &mut stats.compiled }) += 1;
                    cache.insert(sha.clone(), m.clone());
                    m
                }
            }
        };
        let hooks = check_abi(name, &module)?;
        self.start_ticker();
        let ticks = limits.deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()).max(1);
        Ok(PolicyPlugin {
            name: name.into(),
            sha256: sha,
            module,
            engine: self.inner.engine.clone(),
            limits,
            deadline_ticks: u64::try_from(ticks).unwrap_or(u64::MAX),
            hooks,
        })
    }

    /// Number of compiled modules in the cache.
    pub fn cached_modules(&self) -> usize {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Checks the ABI marker, the required exports and the hook signatures; returns the hooks the
/// module exports.
fn check_abi(name: &str, module: &Module) -> Result<Vec<Hook>, PolicyError> {
    let not_policy = |why: String| PolicyError::NotAPolicy { name: name.into(), why };
    let markers: Vec<&str> =
        module.exports().filter_map(|e| e.name().strip_prefix(ABI_MARKER_PREFIX)).collect();
    let expected = POLICY_ABI_VERSION.to_string();
    match markers.as_slice() {
        [] => {
            return Err(not_policy(format!("it exports no {ABI_MARKER_PREFIX}{POLICY_ABI_VERSION} marker")));
        }
        [v] if *v == expected => {}
        found => return Err(PolicyError::AbiVersion { name: name.into(), found: found.join(",v") }),
    }
    if let Some(import) = module.imports().next() {
        return Err(not_policy(format!(
            "it imports {}.{}, but policy plugins get no host functions",
            import.module(),
            import.name()
        )));
    }
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(not_policy("it exports no memory named `memory`".into()));
    }
    if !func_has_type(module, "cdt_alloc", &[ValType::I32], &[ValType::I32]) {
        return Err(not_policy("it exports no function cdt_alloc(i32) -> i32".into()));
    }
    let mut hooks = Vec::new();
    for hook in Hook::ALL {
        let export = hook.export_name();
        if module.get_export(export).is_none() {
            continue;
        }
        if !func_has_type(module, export, &[ValType::I32, ValType::I32], &[ValType::I64]) {
            return Err(not_policy(format!("{export} must be a function (i32, i32) -> i64")));
        }
        hooks.push(hook);
    }
    if hooks.is_empty() {
        return Err(not_policy("it exports none of cdt_select_runner, cdt_admit, cdt_grade".into()));
    }
    Ok(hooks)
}

fn func_has_type(module: &Module, name: &str, params: &[ValType], results: &[ValType]) -> bool {
    let Some(ExternType::Func(ty)) = module.get_export(name) else { return false };
    let same = |a: &mut dyn ExactSizeIterator<Item = ValType>, b: &[ValType]| {
        a.len() == b.len() && a.zip(b).all(|(x, y)| ValType::eq(&x, y))
    };
    same(&mut ty.params(), params) && same(&mut ty.results(), results)
}

/// A loaded, ABI-checked policy plugin. Each call runs in a fresh sandbox.
#[derive(Clone)]
pub struct PolicyPlugin {
    name: String,
    sha256: String,
    module: Module,
    engine: Engine,
    limits: CallLimits,
    deadline_ticks: u64,
    hooks: Vec<Hook>,
}

impl fmt::Debug for PolicyPlugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyPlugin")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("limits", &self.limits)
            .field("hooks", &self.hooks)
            .finish()
    }
}

/// Per-call store state: the memory cap, remembering whether the guest hit it.
struct CallState {
    cap_bytes: usize,
    hit_cap: bool,
}

impl ResourceLimiter for CallState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap_bytes {
            self.hit_cap = true;
            return Err(wasmtime::format_err!("memory cap of {} bytes reached", self.cap_bytes));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        1
    }

    fn memories(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }
}

impl PolicyPlugin {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn limits(&self) -> CallLimits {
        self.limits
    }

    /// The hooks this plugin exports.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// Calls `hook` with JSON `input`. `Ok(None)`: the plugin does not export the hook or has no
    /// opinion (returned 0). `Ok(Some(bytes))`: its output, not yet validated.
    pub fn call(&self, hook: Hook, input: &[u8]) -> Result<Option<Vec<u8>>, PolicyError> {
        if !self.hooks.contains(&hook) {
            return Ok(None);
        }
        let cap_bytes = usize::try_from(self.limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let mut store = Store::new(&self.engine, CallState { cap_bytes, hit_cap: false });
        store.limiter(|s| s);
        self.call_in(&mut store, hook, input).map_err(|failure| PolicyError::Call {
            name: self.name.clone(),
            hook,
            failure,
        })
    }

    fn call_in(
        &self,
        store: &mut Store<CallState>,
        hook: Hook,
        input: &[u8],
    ) -> Result<Option<Vec<u8>>, CallFailure> {
        store.set_fuel(self.limits.fuel).map_err(|e| CallFailure::Trap(e.to_string()))?;
        store.set_epoch_deadline(self.deadline_ticks);
        let bad = |why: &str| CallFailure::BadOutput(why.to_string());
        let instance = Instance::new(&mut *store, &self.module, &[]).map_err(|e| self.classify(store, e))?;
        let memory = instance.get_memory(&mut *store, "memory").ok_or_else(|| bad("no memory export"))?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut *store, "cdt_alloc")
            .map_err(|e| CallFailure::Trap(e.to_string()))?;
        let hook_fn = instance
            .get_typed_func::<(i32, i32), i64>(&mut *store, hook.export_name())
            .map_err(|e| CallFailure::Trap(e.to_string()))?;
        let len = i32::try_from(input.len()).map_err(|_| bad("input larger than 2 GiB"))?;
        let ptr = alloc.call(&mut *store, len).map_err(|e| self.classify(store, e))?;
        memory
            .write(&mut *store, ptr as u32 as usize, input)
            .map_err(|_| bad("cdt_alloc returned a buffer outside linear memory"))?;
        let packed = hook_fn.call(&mut *store, (ptr, len)).map_err(|e| self.classify(store, e))? as u64;
        if packed == 0 {
            return Ok(None);
        }
        let (out_ptr, out_len) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        if out_len > MAX_OUTPUT_BYTES {
            return Err(bad(&format!("output of {out_len} bytes exceeds {MAX_OUTPUT_BYTES}")));
        }
        let data = memory.data(&*store);
        let out = out_ptr
            .checked_add(out_len)
            .and_then(|end| data.get(out_ptr..end))
            .ok_or_else(|| bad("output pointer/length outside linear memory"))?;
        Ok(Some(out.to_vec()))
    }

    fn classify(&self, store: &Store<CallState>, err: wasmtime::Error) -> CallFailure {
        if store.data().hit_cap {
            return CallFailure::MemoryCap { mb: self.limits.memory_mb };
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => CallFailure::OutOfFuel { fuel: self.limits.fuel },
            Some(Trap::Interrupt) => CallFailure::Deadline { ms: self.limits.deadline.as_millis() },
            Some(trap) => CallFailure::Trap(trap.to_string()),
            None => CallFailure::Trap(err.to_string()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Instant;

    use super::*;

    pub(crate) const LOOP: &str = include_str!("../examples/wasm/test/loop.wat");
    pub(crate) const MEMHOG: &str = include_str!("../examples/wasm/test/memhog.wat");
    const WRONG_ABI: &str = include_str!("../examples/wasm/test/wrong_abi.wat");
    pub(crate) const BAD_JSON: &str = include_str!("../examples/wasm/test/bad_json.wat");

    /// A plugin whose hooks return a fixed output (`out`) from a data segment.
    pub(crate) fn constant(out: &str) -> String {
        let packed = (16u64 << 32) | out.len() as u64;
        format!(
            r#"(module (memory (export "memory") 1) (data (i32.const 16) "{}")
               (func (export "cdt_policy_abi_v1"))
               (func (export "cdt_alloc") (param i32) (result i32) (i32.const 1024))
               (func $h (param i32 i32) (result i64) (i64.const {packed}))
               (export "cdt_select_runner" (func $h)) (export "cdt_admit" (func $h))
               (export "cdt_grade" (func $h)))"#,
            out.replace('"', "\\\"")
        )
    }

    pub(crate) fn limits() -> CallLimits {
        CallLimits { fuel: 10_000_000, memory_mb: 16, deadline: Duration::from_millis(1000) }
    }

    #[test]
    fn loop_runs_out_of_fuel_and_the_host_keeps_serving() {
        let host = WasmHost::new().unwrap();
        let looping = host.load_bytes("loop", LOOP.as_bytes(), limits()).unwrap();
        let err = looping.call(Hook::Grade, b"{}").unwrap_err();
        assert!(
            matches!(&err, PolicyError::Call { failure: CallFailure::OutOfFuel { fuel: 10_000_000 }, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("policy plugin loop, hook grade: ran out of fuel"), "{err}");
        let ok = host.load_bytes("ok", constant(r#"{"grade":1}"#).as_bytes(), limits()).unwrap();
        assert_eq!(ok.call(Hook::Grade, b"{}").unwrap().unwrap(), br#"{"grade":1}"#);
    }

    #[test]
    fn loop_with_unbounded_fuel_is_stopped_at_its_deadline() {
        let host = WasmHost::new().unwrap();
        let lim = CallLimits { fuel: u64::MAX / 2, memory_mb: 16, deadline: Duration::from_millis(200) };
        let looping = host.load_bytes("loop", LOOP.as_bytes(), lim).unwrap();
        let start = Instant::now();
        let err = looping.call(Hook::SelectRunner, b"{}").unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(&err, PolicyError::Call { failure: CallFailure::Deadline { ms: 200 }, .. }),
            "{err}"
        );
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn growing_past_the_memory_cap_traps_cleanly() {
        let host = WasmHost::new().unwrap();
        let hog = host.load_bytes("hog", MEMHOG.as_bytes(), limits()).unwrap();
        let err = hog.call(Hook::Grade, b"{}").unwrap_err();
        assert!(
            matches!(&err, PolicyError::Call { failure: CallFailure::MemoryCap { mb: 16 }, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("more than its 16 MiB memory cap"), "{err}");
        // A module whose initial memory is above the cap cannot even start.
        let big = r#"(module (memory (export "memory") 300) (func (export "cdt_policy_abi_v1"))
            (func (export "cdt_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "cdt_admit") (param i32 i32) (result i64) (i64.const 0)))"#;
        let big = host.load_bytes("big", big.as_bytes(), limits()).unwrap();
        let err = big.call(Hook::Admit, b"{}").unwrap_err();
        assert!(matches!(&err, PolicyError::Call { failure: CallFailure::MemoryCap { .. }, .. }), "{err}");
    }

    #[test]
    fn wrong_abi_version_and_non_policies_are_refused_at_load() {
        let host = WasmHost::new().unwrap();
        let err = host.load_bytes("future", WRONG_ABI.as_bytes(), limits()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy plugin future: speaks policy ABI v2, this host speaks v1: refusing to load it"
        );
        let err = host.load_bytes("empty", b"(module)", limits()).unwrap_err();
        assert!(err.to_string().contains("exports no cdt_policy_abi_v1 marker"), "{err}");
        let importer = r#"(module (import "env" "clock" (func)) (memory (export "memory") 1)
            (func (export "cdt_policy_abi_v1"))
            (func (export "cdt_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "cdt_admit") (param i32 i32) (result i64) (i64.const 0)))"#;
        let err = host.load_bytes("importer", importer.as_bytes(), limits()).unwrap_err();
        assert!(err.to_string().contains("imports env.clock"), "{err}");
        let bad_sig = r#"(module (memory (export "memory") 1) (func (export "cdt_policy_abi_v1"))
            (func (export "cdt_alloc") (param i32) (result i32) (i32.const 0))
            (func (export "cdt_grade") (param i32) (result i32) (i32.const 0)))"#;
        let err = host.load_bytes("sig", bad_sig.as_bytes(), limits()).unwrap_err();
        assert!(err.to_string().contains("cdt_grade must be a function (i32, i32) -> i64"), "{err}");
        let err = host.load_bytes("junk", b"\0asm junk", limits()).unwrap_err();
        assert!(matches!(err, PolicyError::Compile { .. }), "{err}");
    }

    #[test]
    fn output_outside_memory_is_bad_output() {
        let host = WasmHost::new().unwrap();
        let bad = host.load_bytes("bad", BAD_JSON.as_bytes(), limits()).unwrap();
        let err = bad.call(Hook::Admit, b"{}").unwrap_err();
        assert!(matches!(&err, PolicyError::Call { failure: CallFailure::BadOutput(_), .. }), "{err}");
        assert_eq!(bad.call(Hook::Grade, b"{}").unwrap().unwrap(), b"grade: twenty{");
        // Not exported: no opinion, nothing runs.
        assert_eq!(bad.call(Hook::SelectRunner, b"{}").unwrap(), None);
    }

    #[test]
    fn compiled_modules_are_cached_by_content() {
        let host = WasmHost::new().unwrap();
        let a = host.load_bytes("a", LOOP.as_bytes(), limits()).unwrap();
        let b = host.load_bytes("b", LOOP.as_bytes(), limits()).unwrap();
        assert_eq!(host.cached_modules(), 1);
        assert_eq!(a.sha256(), b.sha256());
        host.load_bytes("c", MEMHOG.as_bytes(), limits()).unwrap();
        assert_eq!(host.cached_modules(), 2);
        assert_eq!(host.stats(), CacheStats { compiled: 2, disk_hits: 0, memory_hits: 1 });
    }

    #[test]
    fn the_disk_cache_survives_the_host_and_recovers_from_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = WasmHost::with_disk_cache(dir.path()).unwrap();
        first.load_bytes("loop", LOOP.as_bytes(), limits()).unwrap();
        assert_eq!(first.stats(), CacheStats { compiled: 1, disk_hits: 0, memory_hits: 0 });
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1);
        assert!(files[0].to_string_lossy().ends_with(".cwasm"));

        let second = WasmHost::with_disk_cache(dir.path()).unwrap();
        let plugin = second.load_bytes("loop", LOOP.as_bytes(), limits()).unwrap();
        assert_eq!(second.stats(), CacheStats { compiled: 0, disk_hits: 1, memory_hits: 0 });
        assert!(matches!(plugin.call(Hook::Grade, b"{}"), Err(PolicyError::Call { .. })));

        std::fs::write(&files[0], b"not a compiled module").unwrap();
        let third = WasmHost::with_disk_cache(dir.path()).unwrap();
        third.load_bytes("loop", LOOP.as_bytes(), limits()).unwrap();
        assert_eq!(third.stats(), CacheStats { compiled: 1, disk_hits: 0, memory_hits: 0 });
        let fourth = WasmHost::with_disk_cache(dir.path()).unwrap();
        fourth.load_bytes("loop", LOOP.as_bytes(), limits()).unwrap();
        assert_eq!(fourth.stats().disk_hits, 1, "the bad file was replaced");
    }
}
