//! Native runner plugins: shared libraries speaking [`cdtester_runner_api::abi`], loaded once
//! (after their sha256 pin and ABI version are checked) and never unloaded.

use std::path::{Path, PathBuf};

use cdtester_config::NativePluginConfig;
use cdtester_runner_api::abi::{
    AbiVersionFn, CallFn, FreeFn, RUNNER_ABI_VERSION, Reply, RunRequest, SYM_ABI_VERSION, SYM_CALL, SYM_FREE,
};
use cdtester_runner_api::{
    Limits, PreparedProject, ProjectSource, Runner, RunnerError, TaskReport, TaskSpec,
};
use libloading::Library;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::pin::{self, PinError};

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("runner plugin {name}: {source}")]
    Pin { name: String, source: PinError },
    #[error("runner plugin {name}: cannot load {path}: {message}")]
    Load { name: String, path: PathBuf, message: String },
    #[error("runner plugin {name}: {path} does not export {symbol}: not a cdtester runner plugin")]
    Symbol { name: String, path: PathBuf, symbol: &'static str },
    #[error(
        "runner plugin {name}: {path} speaks runner ABI v{found}, this host speaks v{RUNNER_ABI_VERSION}: refusing to use it"
    )]
    AbiVersion { name: String, path: PathBuf, found: u32 },
    #[error("runner plugin {name}: its runner calls itself {actual:?}; the configuration must use that name")]
    Name { name: String, actual: String },
    #[error("runner plugin {name}: {source}")]
    Call { name: String, source: RunnerError },
}

/// A runner living in a native plugin library; every call crosses the C ABI as JSON.
#[derive(Debug)]
pub struct NativeRunner {
    name: String,
    path: PathBuf,
    call: CallFn,
    free: FreeFn,
}

/// Checks the file's sha256 pin, loads it (for the rest of the process), checks its ABI version
/// and that its runner's name is the configured one.
pub fn load_native_runner(config: &NativePluginConfig) -> Result<NativeRunner, NativeError> {
    let name = config.name.clone();
    let path = config.path.clone();
    // Hash the file, then load it; the pin guards against a wrong or tampered file, not against
    // someone with write access swapping it in between (they could replace the config too).
    pin::read_pinned(&path, &config.sha256)
        .map_err(|source| NativeError::Pin { name: name.clone(), source })?;
    // SAFETY: loading runs the library's initialisers; native plugins are trusted code, pinned by
    // sha256 above. The library is leaked: unloading Rust cdylibs is unsound (TLS destructors).
    let lib: &'static Library = match unsafe { Library::new(absolute(&path)) } {
        Ok(lib) => Box::leak(Box::new(lib)),
        Err(e) => return Err(NativeError::Load { name, path, message: e.to_string() }),
    };
    let symbol_err = |symbol| NativeError::Symbol { name: name.clone(), path: path.clone(), symbol };
    // SAFETY: the symbol types are those the ABI defines; the ABI version is checked before any
    // other symbol is called.
    let version: AbiVersionFn =
        unsafe { *lib.get::<AbiVersionFn>(SYM_ABI_VERSION).map_err(|_| symbol_err(SYM_ABI_VERSION))? };
    let found = unsafe { version() };
    if found != RUNNER_ABI_VERSION {
        return Err(NativeError::AbiVersion { name, path, found });
    }
    let call: CallFn = unsafe { *lib.get::<CallFn>(SYM_CALL).map_err(|_| symbol_err(SYM_CALL))? };
    let free: FreeFn = unsafe { *lib.get::<FreeFn>(SYM_FREE).map_err(|_| symbol_err(SYM_FREE))? };
    let runner = NativeRunner { name: name.clone(), path, call, free };
    let actual: String =
        runner.invoke("name", &()).map_err(|source| NativeError::Call { name: name.clone(), source })?;
    if actual != name {
        return Err(NativeError::Name { name, actual });
    }
    tracing::info!("loaded runner plugin {name} from {}", runner.path.display());
    Ok(runner)
}

/// dlopen searches the library path for bare names; a configured relative path means a file.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

impl NativeRunner {
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invoke<I: Serialize, O: DeserializeOwned>(&self, method: &str, input: &I) -> Result<O, RunnerError> {
        let input =
            serde_json::to_vec(input).map_err(|e| RunnerError::Infra(format!("encoding {method}: {e}")))?;
        // SAFETY: both ranges are valid for the call; the returned buffer is owned by the
        // plugin, copied here and handed back to its free function exactly once.
        let out = unsafe {
            let buf = (self.call)(method.as_ptr(), method.len(), input.as_ptr(), input.len());
            let copy = if buf.ptr.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(buf.ptr, buf.len).to_vec()
            };
            (self.free)(buf);
            copy
        };
        match serde_json::from_slice::<Reply<O>>(&out) {
            Ok(Reply::Ok(v)) => Ok(v),
            Ok(Reply::Err(e)) => Err(e.into()),
            Err(e) => {
                Err(RunnerError::Infra(format!("runner plugin {} sent a bad {method} reply: {e}", self.name)))
            }
        }
    }
}

impl Runner for NativeRunner {
    fn name(&self) -> &str {
        &self.name
    }

    fn prepare(&self, source: &ProjectSource) -> Result<PreparedProject, RunnerError> {
        self.invoke("prepare", source)
    }

    fn discover(&self, project: &PreparedProject) -> Result<Vec<String>, RunnerError> {
        self.invoke("discover", project)
    }

    fn run(
        &self,
        project: &PreparedProject,
        task: &TaskSpec,
        limits: &Limits,
    ) -> Result<TaskReport, RunnerError> {
        let req = RunRequest { project: project.clone(), task: task.clone(), limits: limits.clone() };
        self.invoke("run", &req)
    }

    fn release(&self, project: &PreparedProject) {
        if let Err(e) = self.invoke::<_, ()>("release", project) {
            tracing::warn!("runner plugin {}: release of {} failed: {e}", self.name, project.id);
        }
    }
}
