//! The warm worker ("zygote"): one `cdtester_forkserver.py` per Python environment, shared by every
//! project using that environment, that imports pytest (and, for shared environments, the
//! environment's pytest plugins) once and forks a child per module (see that file for the
//! protocol). Every child enters its project's folder and is a fresh `python -m pytest <module>`
//! there in its own session, so results are exactly those of a module run alone; only the
//! interpreter and pytest start-up are saved. Children are confined like fresh runs (same
//! environment, rlimits and uid; see [`super::sandbox`]). [`Zygotes`] keeps at most
//! [`MAX_ZYGOTES`] of them alive, least recently used first out.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::process::{Invocation, kill_group};
use super::sandbox::Confinement;
use crate::pytest::{OutputCap, RunEnd};

/// Python source of the fork server.
pub(crate) const SERVER_SOURCE: &str = include_str!("../../python/cdtester_forkserver.py");
pub(crate) const SERVER_FILE: &str = "cdtester_forkserver.py";

/// How long a fork may take before the server is considered stuck.
const FORK_WAIT: Duration = Duration::from_secs(20);
/// How long to wait for the exit report after killing a timed-out child.
const KILL_WAIT: Duration = Duration::from_secs(20);

/// A line of the warm worker's protocol (see `runners/python/cdtester_forkserver.py`): a fork's
/// pid, then its exit status or signal and the output bytes dropped at the cap. The docker
/// runner speaks the same protocol to the worker inside its containers.
#[derive(Debug, Deserialize)]
pub(crate) struct ServerMessage {
    pub id: u64,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub exit: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub dropped: u64,
}

type Pending = Arc<Mutex<HashMap<u64, Sender<ServerMessage>>>>;

/// Why a warm run could not give a result (the caller then runs the module in a fresh process).
#[derive(Debug, thiserror::Error)]
pub(crate) enum WarmError {
    #[error("warm worker unavailable: {0}")]
    Down(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub(crate) struct WarmServer {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
    pending: Pending,
    next_id: AtomicU64,
}

pub(crate) struct WarmExec {
    pub end: RunEnd,
    pub output: String,
    pub truncated: bool,
    pub wall: f64,
}

impl WarmServer {
    /// Starts a server for the environment of `python` as `spec` says (its own session, the
    /// tests' mount namespace). It keeps the node's uid: its children confine themselves
    /// (rlimits, then the request's uid) before running anything of the project, so they cannot
    /// signal it.
    pub(crate) fn start(spec: &ZygoteSpec, python: &Path) -> std::io::Result<WarmServer> {
        let ZygoteSpec { server_dir, cwd, env, confine, .. } = spec;
        let mut cmd = Command::new(python);
        cmd.arg(server_dir.join(SERVER_FILE));
        if spec.plugins {
            cmd.arg("--plugins");
        }
        cmd.current_dir(cwd)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        confine.apply(&mut cmd);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| std::io::Error::other("no stderr"))?;
        let pending: Pending = Arc::default();
        let p = Arc::clone(&pending);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<ServerMessage>(&line) {
                    Ok(msg) => {
                        let tx = p.lock().unwrap_or_else(|e| e.into_inner()).get(&msg.id).cloned();
                        if let Some(tx) = tx {
                            let _ = tx.send(msg);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, line, "bad message from the warm worker"),
                }
            }
            // The server is gone: every waiter sees its channel close.
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                tracing::warn!(target: "cdtester::warm", "{line}");
            }
        });
        Ok(WarmServer {
            stdin: Mutex::new(Some(stdin)),
            child: Mutex::new(child),
            pending,
            next_id: AtomicU64::new(1),
        })
    }

    /// Whether the server process is still running.
    pub(crate) fn alive(&self) -> bool {
        matches!(self.child.lock().unwrap_or_else(|e| e.into_inner()).try_wait(), Ok(None))
    }

    /// Runs one pytest invocation (`inv.args` after the interpreter, starting with `-m pytest`) in
    /// a forked child confined as `inv.confine` says, in `inv.cwd` with exactly `inv.env`.
    /// `scratch` is a directory for the child's output file, which only this process's uid may
    /// write to.
    pub(crate) fn run(
        &self,
        inv: &Invocation,
        scratch: &Path,
        timeout: Duration,
        output_kib: u64,
    ) -> Result<WarmExec, WarmError> {
        let args = match inv.args {
            [m, pytest, rest @ ..] if m == "-m" && pytest == "pytest" => rest,
            _ => return Err(WarmError::Down("the warm worker only runs `-m pytest`".into())),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let out: PathBuf = scratch.join(format!("warm-{id}.out"));
        let cap = output_kib.saturating_mul(1024);
        let env: HashMap<&str, &str> = inv.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut request = inv.confine.request_fields();
        request.extend([
            ("id".to_string(), id.into()),
            ("args".to_string(), serde_json::json!(args)),
            ("env".to_string(), serde_json::json!(env)),
            ("env_clear".to_string(), true.into()),
            ("cwd".to_string(), serde_json::json!(inv.cwd)),
            ("out".to_string(), serde_json::json!(out)),
            ("cap".to_string(), cap.into()),
        ]);
        let request = serde_json::Value::Object(request);
        let (tx, rx) = mpsc::channel();
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        let result = self.exchange(id, &request, &rx, timeout);
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let (end, dropped, wall) = result?;
        let mut kept = OutputCap::new_kib(output_kib);
        kept.push(&std::fs::read(&out).unwrap_or_default());
        kept.note_dropped(dropped);
        let (output, truncated) = kept.finish();
        let _ = std::fs::remove_file(&out);
        Ok(WarmExec { end, output, truncated, wall })
    }

    fn exchange(
        &self,
        id: u64,
        request: &serde_json::Value,
        rx: &mpsc::Receiver<ServerMessage>,
        timeout: Duration,
    ) -> Result<(RunEnd, u64, f64), WarmError> {
        let started = Instant::now();
        {
            let mut guard = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
            let stdin =
                guard.as_mut().ok_or_else(|| WarmError::Down("the warm worker was stopped".into()))?;
            writeln!(stdin, "{request}")
                .and_then(|_| stdin.flush())
                .map_err(|e| WarmError::Down(format!("cannot send a request: {e}")))?;
        }
        let pid = match rx.recv_timeout(FORK_WAIT) {
            Ok(ServerMessage { pid: Some(pid), .. }) => pid,
            Ok(other) => {
                return Err(WarmError::Down(format!("unexpected answer to request {id}: {other:?}")));
            }
            Err(e) => return Err(WarmError::Down(format!("no fork for request {id}: {e}"))),
        };
        let finished = |msg: ServerMessage| -> (RunEnd, u64) {
            let end = match (msg.exit, msg.signal) {
                (_, Some(sig)) => RunEnd::Signalled(sig),
                (Some(code), None) => RunEnd::Exited(code),
                (None, None) => RunEnd::Exited(-1),
            };
            (end, msg.dropped)
        };
        match rx.recv_timeout(timeout) {
            Ok(msg) => {
                let (end, dropped) = finished(msg);
                Ok((end, dropped, started.elapsed().as_secs_f64()))
            }
            Err(RecvTimeoutError::Timeout) => {
                kill_group(pid);
                let dropped = rx.recv_timeout(KILL_WAIT).map(|m| m.dropped).unwrap_or(0);
                Ok((RunEnd::TimedOut(timeout.as_secs()), dropped, started.elapsed().as_secs_f64()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                kill_group(pid);
                Err(WarmError::Down(format!("the warm worker died while running request {id}")))
            }
        }
    }
}

impl Drop for WarmServer {
    fn drop(&mut self) {
        // Closing stdin makes the server kill its children's groups and exit; kill it if not.
        // Without a request waiting it has no child (each is reaped before its request ends),
        // so it is killed at once (it may still be importing pytest).
        drop(self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take());
        let idle = self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let wait = if idle { Duration::ZERO } else { Duration::from_secs(2) };
        let deadline = Instant::now() + wait;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// How many zygotes (one per Python environment) may be alive at once; starting one more stops
/// the least recently used (a run still using it keeps it until it ends).
pub(crate) const MAX_ZYGOTES: usize = 4;

/// How zygotes are started: the folder of `cdtester_forkserver.py`, the zygote's own working
/// folder (never a project's), its environment and confinement, and whether it imports the
/// environment's pytest plugins (never for an environment that has a project installed in it:
/// the zygote must not run project code).
pub(crate) struct ZygoteSpec {
    pub server_dir: PathBuf,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub confine: Confinement,
    pub plugins: bool,
}

pub(super) struct Zygote {
    server: Arc<WarmServer>,
    used: Instant,
}

/// The live zygotes, by interpreter (one per environment).
#[derive(Default)]
pub(crate) struct Zygotes {
    pub(super) live: Mutex<HashMap<PathBuf, Zygote>>,
}

impl Zygotes {
    /// The zygote of `python`'s environment, started on first use; `None` if it cannot start.
    /// `spec_for` builds how to start it (called only when a new one is needed).
    pub(crate) fn get(
        &self,
        python: &Path,
        spec_for: impl FnOnce() -> ZygoteSpec,
    ) -> Option<Arc<WarmServer>> {
        // Stopped zygotes are dropped after the lock is released (stopping one may wait for it).
        let mut stopped = Vec::new();
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(z) = live.get_mut(python)
            && z.server.alive()
        {
            z.used = Instant::now();
            return Some(Arc::clone(&z.server));
        }
        stopped.extend(live.remove(python));
        while live.len() >= MAX_ZYGOTES {
            let Some(oldest) = live.iter().min_by_key(|(_, z)| z.used).map(|(k, _)| k.clone()) else { break };
            stopped.extend(live.remove(&oldest));
        }
        let started = WarmServer::start(&spec_for(), python);
        let server = match started {
            Ok(server) => Arc::new(server),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the warm worker; using fresh interpreters");
                return None;
            }
        };
        live.insert(python.to_path_buf(), Zygote { server: Arc::clone(&server), used: Instant::now() });
        drop(live);
        drop(stopped);
        Some(server)
    }

    /// Forgets `server` (it failed) if it is still `python`'s zygote.
    pub(crate) fn discard(&self, python: &Path, server: &Arc<WarmServer>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let stopped = if live.get(python).is_some_and(|z| Arc::ptr_eq(&z.server, server)) {
            live.remove(python)
        } else {
            None
        };
        drop(live);
        drop(stopped);
    }

    /// Stops `python`'s zygote (its environment is no longer used).
    pub(crate) fn stop(&self, python: &Path) {
        let stopped = self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(python);
        drop(stopped);
    }
}
