//! Running one pytest process: confined (cleared environment, own session and process group,
//! rlimits, unprivileged uid; see [`super::sandbox`]), with a wall-clock limit (the whole group is
//! killed when it runs out) and stdout+stderr captured into one capped buffer.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::sandbox::Confinement;
use crate::pytest::{OutputCap, RunEnd};

/// How a process run went.
#[derive(Debug)]
pub(crate) struct Exec {
    pub end: RunEnd,
    pub output: String,
    pub truncated: bool,
    pub wall: f64,
}

/// How long to wait for the output pipe to close after the process exited (a background
/// grandchild may hold it open forever).
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// What one invocation needs: interpreter, arguments, its whole environment, working directory
/// and confinement.
pub(crate) struct Invocation<'a> {
    pub python: &'a Path,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    pub confine: &'a Confinement,
}

/// Kills process group `pgid` (SIGKILL). Callers only pass groups they created and still own.
pub(crate) fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 1
    {
        // SAFETY: plain syscall on a process group this runner created (the group leader's pid).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

pub(crate) fn end_of(status: ExitStatus) -> RunEnd {
    match (status.code(), status.signal()) {
        (Some(code), _) => RunEnd::Exited(code),
        (None, Some(sig)) => RunEnd::Signalled(sig),
        (None, None) => RunEnd::Exited(-1),
    }
}

/// Runs `inv` as a fresh process and waits at most `timeout`.
pub(crate) fn run(inv: &Invocation, timeout: Duration, output_kib: u64) -> std::io::Result<Exec> {
    let started = Instant::now();
    let (mut reader, writer) = std::io::pipe()?;
    let mut cmd = Command::new(inv.python);
    cmd.args(inv.args)
        .current_dir(inv.cwd)
        .env_clear()
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    // Its own session, hence its own process group (the pid): what `kill_group` ends.
    inv.confine.apply(&mut cmd);
    let mut child = cmd.spawn()?;
    drop(cmd); // closes our copies of the pipe's write end
    let pid = child.id();

    let cap = Arc::new(Mutex::new(OutputCap::new_kib(output_kib)));
    let (eof_tx, eof_rx) = mpsc::channel();
    {
        let cap = Arc::clone(&cap);
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => cap.lock().unwrap_or_else(|e| e.into_inner()).push(&buf[..n]),
                }
            }
            let _ = eof_tx.send(());
        });
    }
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let end = match done_rx.recv_timeout(timeout) {
        Ok(status) => end_of(status?),
        Err(_) => {
            kill_group(pid);
            done_rx.recv().map_err(|_| std::io::Error::other("lost the child process"))??;
            RunEnd::TimedOut(timeout.as_secs())
        }
    };
    if eof_rx.recv_timeout(PIPE_GRACE).is_err() {
        // Something in the group still holds the output pipe: the group still exists, so its id
        // cannot have been reused; end it.
        kill_group(pid);
        let _ = eof_rx.recv_timeout(PIPE_GRACE);
    }
    let snapshot = cap.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (output, truncated) = snapshot.finish();
    Ok(Exec { end, output, truncated, wall: started.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration, kib: u64) -> Exec {
        let args = vec!["-c".to_string(), script.to_string()];
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let confine = Confinement::default();
        let inv = Invocation {
            python: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            cwd: Path::new("/"),
            confine: &confine,
        };
        run(&inv, timeout, kib).unwrap()
    }

    #[test]
    fn captures_both_streams_and_the_exit_code() {
        let e = sh("echo out; echo err >&2; exit 3", Duration::from_secs(10), 64);
        assert_eq!(e.end, RunEnd::Exited(3));
        assert!(e.output.contains("out") && e.output.contains("err"));
        assert!(!e.truncated);
    }

    #[test]
    fn timeout_kills_the_whole_group_promptly() {
        let t = Instant::now();
        let e = sh("sleep 30 & sleep 30; echo never", Duration::from_millis(300), 64);
        assert_eq!(e.end, RunEnd::TimedOut(0));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(!e.output.contains("never"));
    }

    #[test]
    fn signal_death_and_output_cap_are_reported() {
        let e = sh("head -c 5000 /dev/zero | tr '\\0' x; kill -9 $$", Duration::from_secs(10), 1);
        assert_eq!(e.end, RunEnd::Signalled(9));
        assert!(e.truncated);
        assert!(e.output.contains("3976 more bytes dropped"), "{}", e.output);
    }

    #[test]
    fn a_background_child_holding_the_pipe_does_not_hang_us() {
        let t = Instant::now();
        let e = sh("sleep 30 & echo started", Duration::from_secs(10), 64);
        assert_eq!(e.end, RunEnd::Exited(0));
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.output.contains("started"));
    }
}
