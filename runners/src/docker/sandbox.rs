//! One locked-down container and the processes run in it.
//!
//! A sandbox is created from the runner image with the default-deny profile (no network,
//! memory = memory+swap, pids limit, CPU quota, read-only root, a size-capped tmpfs at `/tmp`,
//! every capability dropped, no-new-privileges, an unprivileged user, an init that reaps
//! zombies, a capped log), labelled with the node and project it belongs to, and kept running
//! (`sleep infinity` under the init) so that each module is one `exec` into it.
//!
//! Every exec runs under a tiny shell wrapper that, after the command, prints how many processes
//! are left in the container: a command that leaves processes behind (a fork bomb, a daemon)
//! makes the runner discard the container instead of reusing it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::pin::Pin;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType, ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use cdtester_runner_api::Limits;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::DockerError;
use super::volumes::Source;
use crate::local::warm::ServerMessage;
use crate::pytest::{MARK, OutputCap};

/// Label naming the node a container belongs to (what orphan cleanup filters on).
pub const LABEL_NODE: &str = "cdtester.node";
/// Label naming the project a container runs.
pub const LABEL_PROJECT: &str = "cdtester.project";
/// Label naming the process that made the container (`<pid>-<start time>`, see [`owner_id`]).
pub const LABEL_OWNER: &str = "cdtester.owner";
/// The unprivileged user every process runs as (Debian's `nobody`).
pub const USER: &str = "65534:65534";
/// Writable, size-capped scratch space; the project is copied to `WORK_DIR` inside it.
pub const TMPFS: &str = "/tmp";
/// Where the project's files are, writable, for the container's lifetime.
pub const WORK_DIR: &str = "/tmp/work";
/// Marker of the wrapper's trailer line (on stderr).
const TRAILER: &str = "@@cdtester-exec@@ ";
/// Record bytes kept per exec; beyond this a module's records are cut (a safeguard against a
/// test that floods stderr with record-like lines).
const RECORDS_CAP: usize = 64 << 20;
/// A stderr line longer than this is treated as output, not as a record.
const LINE_CAP: usize = 4 << 20;
/// How long a timed-out warm child gets to be killed and reported before its container goes.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output may still arrive after the wrapper's trailer.
const TRAILER_GRACE: Duration = Duration::from_millis(500);
/// Runs `"$@"`, empties the tmpfs except the work directory (pytest's temporary directories,
/// whatever the module left in /tmp), then reports its status, the number of processes left in
/// the container and the tmpfs's free space (blocks, block size).
const WRAPPER: &str = "\"$@\"; rc=$?; \
    for f in /tmp/* /tmp/.[!.]* /tmp/..?*; do [ -e \"$f\" ] && [ \"$f\" != /tmp/work ] && rm -rf \"$f\"; done; \
    free=$(stat -f -c '%a %S' /tmp 2>/dev/null); set -- /proc/[0-9]*; \
    echo \"@@cdtester-exec@@ $rc $# $free\" >&2; exit $rc";

/// A directory mounted into the container (see [`super::volumes`]).
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: Source,
    pub container: String,
    pub read_only: bool,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub image: String,
    pub node_id: String,
    pub project_id: String,
    pub limits: Limits,
    pub binds: Vec<Bind>,
    pub env: Vec<String>,
}

/// A running container.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    pub limits: Limits,
    /// What the set-up exec's trailer said: the processes a finished exec leaves when nothing
    /// lingers (init, sleep, the wrapper) and the tmpfs's free space with only the project in it.
    baseline: Trailer,
    /// The container's cgroup OOM-kill count as last seen.
    oom_kills: u64,
    /// The warm pytest worker running in the container, once started.
    warm: Option<Warm>,
}

/// The warm worker (`cdtester_forkserver.py`, shared with the local runner): an exec that has
/// imported pytest and forks one child per module. Its stderr is merged into its stdout, and each
/// child's output (records included) is sent to that same stdout, so a module's output always
/// arrives before the worker's line saying the child exited.
struct Warm {
    input: Pin<Box<dyn AsyncWrite + Send>>,
    output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    next_id: u64,
    carry: Vec<u8>,
}

impl Warm {
    /// Reads the worker's output into `sink` until it says request `id`'s child exited (noting
    /// the child's pid in `child` when it is forked).
    async fn read_until_exit(
        &mut self,
        id: u64,
        sink: &mut Sink,
        child: &mut Option<u32>,
    ) -> Result<ServerMessage, String> {
        loop {
            let chunk = match self.output.next().await {
                None => return Err("the warm worker's output ended".to_string()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(LogOutput::StdOut { message } | LogOutput::StdErr { message })) => message,
                Some(Ok(_)) => continue,
            };
            self.carry.extend_from_slice(&chunk);
            while let Some(pos) = self.carry.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.carry.drain(..=pos).collect();
                match server_message(&line) {
                    Some((at, msg)) if msg.id == id => {
                        if at > 0 {
                            sink.line(&line[..at]);
                        }
                        if msg.pid.is_some() {
                            *child = msg.pid;
                        }
                        if msg.exit.is_some() || msg.signal.is_some() {
                            return Ok(msg);
                        }
                    }
                    _ => sink.line(&line),
                }
            }
            if self.carry.len() > LINE_CAP {
                let line = std::mem::take(&mut self.carry);
                sink.output.push(&line);
            }
        }
    }
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm").field("next_id", &self.next_id).finish_non_exhaustive()
    }
}

/// Where a protocol message starts: the worker writes `json.dumps({"id": ...})` lines.
const SERVER_PREFIX: &[u8] = b"{\"id\": ";

/// The protocol message at the end of `line` (after any unterminated output of the child) and
/// where it starts.
fn server_message(line: &[u8]) -> Option<(usize, ServerMessage)> {
    let at = line.windows(SERVER_PREFIX.len()).rposition(|w| w == SERVER_PREFIX)?;
    let text = std::str::from_utf8(&line[at..]).ok()?;
    let msg = serde_json::from_str(text.trim_end()).ok()?;
    Some((at, msg))
}

/// How an exec ended.
#[derive(Debug)]
pub struct ExecResult {
    /// The command's exit status (128 + signal when a signal killed it); `None` if unknown.
    pub exit: Option<i64>,
    /// The wall-clock limit ran out; the container has been removed.
    pub timed_out: bool,
    /// The command was killed by the kernel's OOM killer (the cgroup's count went up).
    pub oom: bool,
    /// Processes were left behind (or the wrapper's trailer is missing): do not reuse.
    pub tainted: bool,
    /// Every reporting-plugin record line, in order.
    pub records: String,
    /// Everything else the command printed (stdout, then non-record stderr), capped.
    pub output: OutputCap,
    pub elapsed: Duration,
}

/// The container settings for `spec`, in bollard's terms.
pub fn container_body(spec: &SandboxSpec) -> ContainerCreateBody {
    let limits = &spec.limits;
    let memory = i64::try_from(limits.memory_mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    let tmpfs = HashMap::from([(
        TMPFS.to_string(),
        format!("rw,nosuid,nodev,size={}m,mode=1777", limits.tmpfs_mb.max(1)),
    )]);
    let mounts = spec
        .binds
        .iter()
        .map(|b| {
            let (source, typ) = match &b.source {
                Source::Host(path) => (path.to_string_lossy().into_owned(), MountType::BIND),
                Source::Volume(name) => (name.clone(), MountType::VOLUME),
            };
            Mount {
                target: Some(b.container.clone()),
                source: Some(source),
                typ: Some(typ),
                read_only: Some(b.read_only),
                ..Default::default()
            }
        })
        .collect();
    let host_config = HostConfig {
        network_mode: Some("none".into()),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some((limits.cpus.max(0.01) * 1e9) as i64),
        pids_limit: Some(i64::try_from(limits.pids).unwrap_or(i64::MAX).max(8)),
        readonly_rootfs: Some(true),
        tmpfs: Some(tmpfs),
        mounts: Some(mounts),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        init: Some(true),
        privileged: Some(false),
        ipc_mode: Some("private".into()),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), "1m".to_string()),
                ("max-file".to_string(), "1".to_string()),
            ])),
        }),
        ulimits: Some(vec![
            ResourcesUlimits { name: Some("core".into()), soft: Some(0), hard: Some(0) },
            ResourcesUlimits { name: Some("nofile".into()), soft: Some(1024), hard: Some(1024) },
        ]),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(vec!["/bin/sleep".into(), "infinity".into()]),
        user: Some(USER.into()),
        working_dir: Some("/".into()),
        env: Some(spec.env.clone()),
        network_disabled: Some(true),
        labels: Some(HashMap::from([
            (LABEL_NODE.to_string(), spec.node_id.clone()),
            (LABEL_PROJECT.to_string(), spec.project_id.clone()),
            (LABEL_OWNER.to_string(), owner_id().to_string()),
        ])),
        host_config: Some(host_config),
        ..Default::default()
    }
}

impl Sandbox {
    /// Creates and starts a container, then copies `/src` (if bound) into the work directory.
    pub async fn start(docker: &Docker, spec: &SandboxSpec) -> Result<Sandbox, DockerError> {
        let name = format!("cdtester-{}-{}", sanitize(&spec.project_id), unique_suffix());
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = docker
            .create_container(Some(options), container_body(spec))
            .await
            .map_err(|e| DockerError::engine("creating a container", e))?;
        let mut sandbox = Sandbox {
            id: created.id,
            limits: spec.limits.clone(),
            baseline: Trailer::default(),
            oom_kills: 0,
            warm: None,
        };
        if let Err(e) = docker.start_container(&sandbox.id, None).await {
            remove(docker, &sandbox.id).await;
            return Err(DockerError::engine("starting a container", e));
        }
        let copy = format!("mkdir -p {WORK_DIR} && if [ -d /src ]; then cp -R /src/. {WORK_DIR}/; fi");
        let setup = sandbox
            .exec(docker, &["/bin/sh".into(), "-c".into(), copy], "/", &[], Duration::from_secs(120), 64)
            .await;
        match setup {
            Ok(Wrapped { result, trailer: Some(trailer) }) if result.exit == Some(0) && !result.timed_out => {
                sandbox.baseline = trailer;
                Ok(sandbox)
            }
            Ok(r) => {
                remove(docker, &sandbox.id).await;
                let (text, _) = r.result.output.finish();
                Err(DockerError::Command {
                    what: "copying the project into the container".into(),
                    detail: format!("exit {:?}: {}", r.result.exit, text.trim()),
                })
            }
            Err(e) => {
                remove(docker, &sandbox.id).await;
                Err(e)
            }
        }
    }

    /// Runs `cmd` in the work directory under the wrapper, with a wall-clock limit. On timeout
    /// the whole container is removed (the command and anything it started die with it).
    pub async fn run(
        &mut self,
        docker: &Docker,
        cmd: &[String],
        env: &[String],
        timeout: Duration,
        output_kib: u64,
    ) -> Result<ExecResult, DockerError> {
        let Wrapped { mut result, trailer } =
            self.exec(docker, cmd, WORK_DIR, env, timeout, output_kib).await?;
        if result.timed_out {
            remove(docker, &self.id).await;
            return Ok(result);
        }
        result.tainted = trailer.is_none_or(|t| t.tainted_against(&self.baseline));
        if result.exit.is_none_or(|c| c >= 128) {
            result.oom = self.oom_increased(docker).await;
        }
        Ok(result)
    }

    /// Runs one pytest invocation (`args` after `-m pytest`) in a child forked from the warm
    /// worker, starting the worker first if needed. `Ok(None)` when the worker is unavailable
    /// before the fork (the caller then runs the module in a fresh interpreter with [`run`]).
    /// After the module, one short exec empties the tmpfs and checks for leftover processes.
    ///
    /// [`run`]: Sandbox::run
    pub async fn run_warm(
        &mut self,
        docker: &Docker,
        server: &[String],
        args: &[String],
        env: &[(String, String)],
        timeout: Duration,
        output_kib: u64,
    ) -> Result<Option<ExecResult>, DockerError> {
        if self.warm.is_none() {
            match self.start_warm(docker, server).await {
                Ok(w) => self.warm = Some(w),
                Err(e) => {
                    tracing::warn!(container = %self.id, error = %e, "warm worker unavailable; running cold");
                    return Ok(None);
                }
            }
        }
        let Some(warm) = self.warm.as_mut() else { return Ok(None) };
        let id = warm.next_id;
        warm.next_id += 1;
        let env: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Output is capped here, not by the worker: records must never be cut.
        let request =
            serde_json::json!({"id": id, "args": args, "env": env, "out": "/dev/stdout", "cap": 1u64 << 40});
        let line = format!("{request}\n");
        if warm.input.write_all(line.as_bytes()).await.is_err() || warm.input.flush().await.is_err() {
            self.warm = None;
            return Ok(None);
        }
        let started = Instant::now();
        let mut sink = Sink::new(output_kib);
        let mut child: Option<u32> = None;
        let outcome = tokio::time::timeout(timeout, warm.read_until_exit(id, &mut sink, &mut child)).await;
        let elapsed = started.elapsed();
        let mut result = ExecResult {
            exit: None,
            timed_out: false,
            oom: false,
            tainted: false,
            records: String::new(),
            output: OutputCap::new_kib(0),
            elapsed,
        };
        match outcome {
            Err(_) => {
                // Kill the child's process group so that the worker flushes what the child
                // reported (finished tests keep their verdicts), then the whole container.
                if let Some(pid) = child {
                    let kill = ["/bin/sh".to_string(), "-c".into(), format!("kill -9 -{pid}")];
                    if self.exec(docker, &kill, "/", &[], KILL_GRACE, 16).await.is_ok()
                        && let Some(warm) = self.warm.as_mut()
                    {
                        let _ =
                            tokio::time::timeout(KILL_GRACE, warm.read_until_exit(id, &mut sink, &mut child))
                                .await;
                    }
                }
                self.warm = None;
                remove(docker, &self.id).await;
                result.timed_out = true;
            }
            Ok(Err(e)) => {
                self.warm = None;
                if child.is_none() {
                    tracing::warn!(container = %self.id, error = %e, "warm worker failed; running cold");
                    return Ok(None);
                }
                // The worker died under the child (e.g. the OOM killer took it): no status.
                result.tainted = true;
                result.oom = self.oom_increased(docker).await;
            }
            Ok(Ok(msg)) => {
                result.exit = match (msg.exit, msg.signal) {
                    (_, Some(sig)) => Some(128 + i64::from(sig)),
                    (Some(code), None) => Some(i64::from(code)),
                    (None, None) => None,
                };
                if msg.signal.is_some() {
                    result.oom = self.oom_increased(docker).await;
                }
                let check =
                    self.exec(docker, &["/bin/true".into()], "/", &[], Duration::from_secs(30), 16).await?;
                let baseline = Trailer { procs: self.baseline.procs + 1, ..self.baseline.clone() };
                result.tainted = check.trailer.is_none_or(|t| t.tainted_against(&baseline));
            }
        }
        result.records = std::mem::take(&mut sink.records);
        sink.finish();
        result.output = sink.output;
        Ok(Some(result))
    }

    async fn start_warm(&self, docker: &Docker, server: &[String]) -> Result<Warm, DockerError> {
        let mut argv: Vec<String> =
            vec!["/bin/sh".into(), "-c".into(), "exec \"$@\" 2>&1".into(), "sh".into()];
        argv.extend(server.iter().cloned());
        let options = CreateExecOptions {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv),
            working_dir: Some(WORK_DIR.to_string()),
            user: Some(USER.to_string()),
            ..Default::default()
        };
        let exec = docker
            .create_exec(&self.id, options)
            .await
            .map_err(|e| DockerError::engine("creating the warm worker", e))?;
        match docker.start_exec(&exec.id, None).await {
            Ok(StartExecResults::Attached { output, input }) => {
                Ok(Warm { input, output, next_id: 1, carry: Vec::new() })
            }
            Ok(StartExecResults::Detached) => Err(DockerError::Command {
                what: "starting the warm worker".into(),
                detail: "the engine did not attach to it".into(),
            }),
            Err(e) => Err(DockerError::engine("starting the warm worker", e)),
        }
    }

    /// Whether the container's OOM-kill counter went up since last seen (and remembers it).
    async fn oom_increased(&mut self, docker: &Docker) -> bool {
        match self.oom_kill_count(docker).await {
            Some(k) => {
                let up = k > self.oom_kills;
                self.oom_kills = k;
                up
            }
            None => false,
        }
    }

    async fn exec(
        &self,
        docker: &Docker,
        cmd: &[String],
        workdir: &str,
        env: &[String],
        timeout: Duration,
        output_kib: u64,
    ) -> Result<Wrapped, DockerError> {
        let mut argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), WRAPPER.into(), "sh".into()];
        argv.extend(cmd.iter().cloned());
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv),
            env: Some(env.to_vec()),
            working_dir: Some(workdir.to_string()),
            user: Some(USER.to_string()),
            ..Default::default()
        };
        let started = Instant::now();
        let exec = docker
            .create_exec(&self.id, options)
            .await
            .map_err(|e| DockerError::engine("creating an exec", e))?;
        let mut sink = Sink::new(output_kib);
        // Ends with whether output was still open after the wrapper's trailer (processes left
        // behind hold the exec's pipes: the exec is over, they are not).
        let stream = async {
            let mut output = match docker.start_exec(&exec.id, None).await {
                Ok(StartExecResults::Attached { output, .. }) => output,
                Ok(StartExecResults::Detached) => return Ok(false),
                Err(e) => return Err(DockerError::engine("starting an exec", e)),
            };
            loop {
                let next = if sink.trailer.is_some() {
                    match tokio::time::timeout(TRAILER_GRACE, output.next()).await {
                        Ok(next) => next,
                        Err(_) => return Ok(true),
                    }
                } else {
                    output.next().await
                };
                match next {
                    None => return Ok(false),
                    Some(Ok(bollard::container::LogOutput::StdOut { message })) => sink.output.push(&message),
                    Some(Ok(bollard::container::LogOutput::StdErr { message })) => sink.stderr(&message),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(DockerError::engine("reading an exec's output", e)),
                }
            }
        };
        let (timed_out, lingering) = match tokio::time::timeout(timeout, stream).await {
            Ok(r) => (false, r?),
            Err(_) => (true, false),
        };
        let elapsed = started.elapsed();
        let trailer = sink.finish();
        let exit = if timed_out {
            None
        } else {
            let info = docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| DockerError::engine("inspecting an exec", e))?;
            info.exit_code
        };
        let rc = trailer.as_ref().map(|t| t.rc);
        let trailer = trailer.filter(|_| !lingering);
        Ok(Wrapped {
            result: ExecResult {
                exit: rc.or(exit),
                timed_out,
                oom: false,
                tainted: false,
                records: sink.records,
                output: sink.output,
                elapsed,
            },
            trailer,
        })
    }

    /// Streams `tar -C <dir> -cf - .`, run in the container, chunk by chunk into `sink`.
    /// `Ok(false)` when `sink` stopped taking chunks (its reader gave up). The stream is what
    /// the container says: the reader must check everything in it.
    pub async fn export_tar(
        &self,
        docker: &Docker,
        dir: &str,
        timeout: Duration,
        sink: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<bool, DockerError> {
        let what = "exporting the environment build output";
        let argv = ["/bin/tar", "-C", dir, "-cf", "-", "."].map(String::from).to_vec();
        let options = CreateExecOptions {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(argv),
            working_dir: Some("/".to_string()),
            user: Some(USER.to_string()),
            ..Default::default()
        };
        let exec = docker
            .create_exec(&self.id, options)
            .await
            .map_err(|e| DockerError::engine("creating an exec", e))?;
        let mut errors = OutputCap::new_kib(4);
        let stream = async {
            let mut output = match docker.start_exec(&exec.id, None).await {
                Ok(StartExecResults::Attached { output, .. }) => output,
                Ok(StartExecResults::Detached) => return Ok(true),
                Err(e) => return Err(DockerError::engine("starting an exec", e)),
            };
            while let Some(item) = output.next().await {
                match item {
                    Ok(LogOutput::StdOut { message }) => {
                        if sink.send(message).await.is_err() {
                            return Ok(false);
                        }
                    }
                    Ok(LogOutput::StdErr { message }) => errors.push(&message),
                    Ok(_) => {}
                    Err(e) => return Err(DockerError::engine("reading an exec's output", e)),
                }
            }
            Ok(true)
        };
        let complete = match tokio::time::timeout(timeout, stream).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(DockerError::Command {
                    what: what.into(),
                    detail: format!("timed out after {} s", timeout.as_secs()),
                });
            }
        };
        if !complete {
            return Ok(false);
        }
        let info =
            docker.inspect_exec(&exec.id).await.map_err(|e| DockerError::engine("inspecting an exec", e))?;
        if info.exit_code != Some(0) {
            let (text, _) = errors.finish();
            return Err(DockerError::Command {
                what: what.into(),
                detail: format!("tar exit {:?}: {}", info.exit_code, text.trim()),
            });
        }
        Ok(true)
    }

    /// The container's cgroup OOM-kill counter (cgroup v1 `memory.oom_control` or v2
    /// `memory.events`), read from inside.
    async fn oom_kill_count(&self, docker: &Docker) -> Option<u64> {
        let cmd = [
            "/bin/cat".to_string(),
            "/sys/fs/cgroup/memory/memory.oom_control".into(),
            "/sys/fs/cgroup/memory.events".into(),
        ];
        let probe = self.exec(docker, &cmd, "/", &[], Duration::from_secs(10), 16).await.ok()?;
        let (text, _) = probe.result.output.finish();
        parse_oom_kills(&text)
    }
}

/// The sum of `oom_kill N` lines (both cgroup versions name the counter that way).
fn parse_oom_kills(text: &str) -> Option<u64> {
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok()))
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

struct Wrapped {
    result: ExecResult,
    /// The wrapper's report; `None` when it is missing or processes still held the output open.
    trailer: Option<Trailer>,
}

/// What the wrapper reports after a command.
#[derive(Debug, Clone, Default, PartialEq)]
struct Trailer {
    /// The command's exit status.
    rc: i64,
    /// Processes in the container, the wrapper included.
    procs: u32,
    /// Free bytes on the tmpfs, when `stat` could tell.
    free: Option<u64>,
}

impl Trailer {
    fn parse(text: &str) -> Option<Trailer> {
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        let rc = text.split_whitespace().next()?.parse::<i64>().ok()?;
        parts.next();
        let procs = u32::try_from(parts.next()?.ok()?).ok()?;
        let free = match (parts.next(), parts.next()) {
            (Some(Ok(blocks)), Some(Ok(size))) => Some(blocks.saturating_mul(size)),
            _ => None,
        };
        Some(Trailer { rc, procs, free })
    }

    /// A container is not reused after a command that left processes behind or ate more than
    /// half of the tmpfs space the project left free.
    fn tainted_against(&self, baseline: &Trailer) -> bool {
        let leftovers = self.procs > baseline.procs;
        let filled = matches!((self.free, baseline.free), (Some(now), Some(before)) if now < before / 2);
        leftovers || filled
    }
}

/// Splits an exec's stderr into plugin records, the wrapper's trailer and plain output.
struct Sink {
    output: OutputCap,
    records: String,
    partial: Vec<u8>,
    trailer: Option<Trailer>,
}

impl Sink {
    fn new(output_kib: u64) -> Sink {
        Sink {
            output: OutputCap::new_kib(output_kib),
            records: String::new(),
            partial: Vec::new(),
            trailer: None,
        }
    }

    fn stderr(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.line(&line);
        }
        if self.partial.len() > LINE_CAP {
            let line = std::mem::take(&mut self.partial);
            self.output.push(&line);
        }
    }

    fn line(&mut self, line: &[u8]) {
        if let Some(rest) = line.strip_prefix(TRAILER.as_bytes())
            && let Some(t) = Trailer::parse(&String::from_utf8_lossy(rest))
        {
            self.trailer = Some(t);
            return;
        }
        if contains(line, MARK.as_bytes()) {
            if self.records.len() + line.len() <= RECORDS_CAP {
                self.records.push_str(&String::from_utf8_lossy(line));
            }
            return;
        }
        self.output.push(line);
    }

    /// Flushes a last unterminated line; returns the wrapper's trailer.
    fn finish(&mut self) -> Option<Trailer> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line);
        }
        self.trailer.take()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Removes a container and everything running in it; errors are logged (it may be gone).
pub async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => tracing::debug!(container = %id, "container removed"),
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {}
        Err(e) => tracing::warn!(container = %id, error = %e, "could not remove container"),
    }
}

/// Every container (running or not) carrying `label=value`, with its labels.
pub async fn labelled(
    docker: &Docker,
    label: &str,
    value: &str,
) -> Result<Vec<(String, HashMap<String, String>)>, DockerError> {
    let filters = HashMap::from([("label".to_string(), vec![format!("{label}={value}")])]);
    let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    let found = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| DockerError::engine("listing containers", e))?;
    Ok(found.into_iter().filter_map(|c| Some((c.id?, c.labels.unwrap_or_default()))).collect())
}

/// This process as `<pid>-<start time in clock ticks since boot>`: unique on this machine even
/// when pids are reused.
pub fn owner_id() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| {
        let pid = std::process::id();
        format!("{pid}-{}", start_time(pid).unwrap_or(0))
    })
}

/// Whether the process an [`owner_id`] names is still running.
pub fn owner_alive(owner: &str) -> bool {
    let Some((pid, start)) = owner.split_once('-') else { return false };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return false };
    start_time(pid) == Some(start)
}

/// Field 22 of `/proc/<pid>/stat` (after the parenthesised command name, which may hold spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn sanitize(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(40)
        .collect();
    if clean.is_empty() { "project".into() } else { clean }
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{:x}-{n}", std::process::id(), nanos & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            image: "cdtester-runner:latest".into(),
            node_id: "127.0.0.1:7000".into(),
            project_id: "p1".into(),
            limits: Limits { memory_mb: 300, pids: 64, cpus: 1.5, tmpfs_mb: 32, ..Limits::default() },
            binds: vec![Bind {
                source: Source::Host("/h/src".into()),
                container: "/src".into(),
                read_only: true,
            }],
            env: vec!["HOME=/tmp".into()],
        }
    }

    #[test]
    fn profile_is_default_deny() {
        let body = container_body(&spec());
        let hc = body.host_config.unwrap();
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
        assert_eq!(hc.memory, Some(300 << 20));
        assert_eq!(hc.memory_swap, hc.memory);
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        assert_eq!(hc.pids_limit, Some(64));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_string()]));
        assert_eq!(hc.init, Some(true));
        assert_eq!(hc.privileged, Some(false));
        assert!(hc.tmpfs.unwrap()[TMPFS].contains("size=32m"));
        assert!(hc.log_config.unwrap().config.unwrap().contains_key("max-size"));
        let mount = &hc.mounts.unwrap()[0];
        assert_eq!(mount.read_only, Some(true));
        assert_eq!(body.user.as_deref(), Some(USER));
        let labels = body.labels.unwrap();
        assert_eq!(labels[LABEL_NODE], "127.0.0.1:7000");
        assert_eq!(labels[LABEL_OWNER], owner_id());
    }

    #[test]
    fn sink_separates_records_trailer_and_output() {
        let mut sink = Sink::new(1);
        sink.stderr(b"warn\n@@cdtester@@ {\"e\":\"end\"");
        sink.stderr(b",\"exit\":0}\n");
        sink.output.push(b"out\n");
        sink.stderr(b"@@cdtester-exec@@ 1 3 100 4096\n");
        assert_eq!(sink.finish(), Some(Trailer { rc: 1, procs: 3, free: Some(409_600) }));
        assert_eq!(sink.records, "@@cdtester@@ {\"e\":\"end\",\"exit\":0}\n");
        let (text, truncated) = sink.output.finish();
        assert_eq!(text, "warn\nout\n");
        assert!(!truncated);
    }

    #[test]
    fn sink_without_trailer_reports_none_and_keeps_the_last_line() {
        let mut sink = Sink::new(1);
        sink.stderr(b"Killed");
        assert_eq!(sink.finish(), None);
        assert_eq!(sink.output.finish().0, "Killed");
    }

    #[test]
    fn worker_messages_are_found_after_unterminated_output() {
        let (at, msg) = server_message(b"no newline{\"id\": 7, \"dropped\": 0, \"exit\": 1}\n").unwrap();
        assert_eq!((at, msg.id, msg.exit, msg.signal), (10, 7, Some(1), None));
        let (at, msg) = server_message(b"{\"id\": 3, \"pid\": 42}\n").unwrap();
        assert_eq!((at, msg.pid), (0, Some(42)));
        assert!(server_message(b"{\"idx\": 3}\n").is_none());
        assert!(server_message(b"plain output\n").is_none());
    }

    #[test]
    fn leftover_processes_or_a_filled_tmpfs_taint_the_container() {
        let base = Trailer { rc: 0, procs: 3, free: Some(1000) };
        assert!(!Trailer { rc: 1, procs: 3, free: Some(900) }.tainted_against(&base));
        assert!(Trailer { rc: 0, procs: 4, free: Some(1000) }.tainted_against(&base));
        assert!(Trailer { rc: 0, procs: 3, free: Some(10) }.tainted_against(&base));
        assert!(!Trailer { rc: 0, procs: 3, free: None }.tainted_against(&base));
        assert_eq!(Trailer::parse("137 5"), Some(Trailer { rc: 137, procs: 5, free: None }));
        assert_eq!(Trailer::parse("x 5"), None);
    }

    #[test]
    fn oom_counter_is_read_from_either_cgroup_version() {
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"), Some(2));
        assert_eq!(parse_oom_kills("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"), Some(1));
        assert_eq!(parse_oom_kills("cat: no such file\n"), None);
    }

    #[test]
    fn owner_ids_tell_live_processes_from_dead_ones() {
        assert!(owner_alive(owner_id()));
        let pid = std::process::id();
        assert!(!owner_alive(&format!("{pid}-1")), "same pid, other start time: a reused pid");
        assert!(!owner_alive("4194999-5"));
        assert!(!owner_alive("garbage"));
    }

    #[test]
    fn names_are_docker_safe() {
        assert_eq!(sanitize("a/b c:1"), "a-b-c-1");
        assert_eq!(sanitize(""), "project");
    }
}
