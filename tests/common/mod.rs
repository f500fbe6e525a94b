//! Helpers shared by the end-to-end tests (each test file does `mod common;` and uses a part).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `cdtester` binary under test.
pub fn cdtester_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cdtester"))
}

/// Folder for caches kept between test runs: `$CDT_TEST_CACHE`, else `<target>/tmp/cdt-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CDT_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("cdt-cache"))
}

/// Where corpus sdists are cached: `$CDT_CORPUS_CACHE`, else `<cache_dir>/corpus`.
pub fn corpus_cache() -> PathBuf {
    std::env::var_os("CDT_CORPUS_CACHE").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("corpus"))
}

/// A `cdtester` command isolated from the user's configuration: its data folder is `data_dir`,
/// Python environments are cached in `<cache_dir>/venvs` (shared by all tests), logs are quiet.
pub fn cdtester(data_dir: &Path) -> Command {
    let mut cmd = Command::new(cdtester_bin());
    cmd.env("CDT_NODE__DATA_DIR", data_dir)
        .env("CDT_RUNNER__LOCAL__VENV_DIR", cache_dir().join("venvs"))
        .env("CDT_LOG", "warn")
        .env_remove("CDT_CONFIG")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` and returns its output, with stdout/stderr in the panic message if it cannot start.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Writes `text` to `root/rel`, creating folders.
pub fn write_file(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("file has a parent")).expect("create folder");
    std::fs::write(&path, text).expect("write file");
}

/// stdout and stderr of `out`, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cdtester run --json` output, parsed (panics with the output when it is not JSON).
pub fn run_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", describe(out)))
}

/// One HTTP/1.0 exchange on a plain socket, as any client of any implementation would make it:
/// (status, raw head, body) of `method path` with an optional (content type, body).
pub fn http_raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Option<(u16, String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n").into_bytes();
    if let Some((ct, b)) = body {
        req.extend(format!("Content-Type: {ct}\r\nContent-Length: {}\r\n", b.len()).bytes());
        req.extend(b"\r\n");
        req.extend(b);
    } else {
        req.extend(b"\r\n");
    }
    s.write_all(&req).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, head, raw[split + 4..].to_vec()))
}

/// [`http_raw`] with a JSON answer (`null` when the body is not JSON).
pub fn http_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Option<(u16, serde_json::Value)> {
    let (status, _, body) = http_raw(addr, method, path, body)?;
    Some((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
}

/// `POST /evaluation` of a zip as the multipart upload every implementation accepts; the id
/// (a string from reference nodes, an integer from cdtester) as text.
pub fn submit_zip(http: std::net::SocketAddr, zip: &[u8]) -> String {
    let b = "cdtesterinteropboundary";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"eval.zip\"\r\nContent-Type: application/zip\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(zip);
    body.extend(format!("\r\n--{b}--\r\n").bytes());
    let ct = format!("multipart/form-data; boundary={b}");
    let (status, v) =
        http_call(http, "POST", "/evaluation", Some((&ct, &body))).expect("submission answered");
    assert_eq!(status, 200, "{v}");
    let id = if v["eval_id"].is_null() { v["id"].clone() } else { v["eval_id"].clone() };
    id.as_str().map_or_else(|| id.to_string(), String::from)
}

/// Polls `ok` every 20 ms for at most `limit`; whether it held.
pub fn wait_until(limit: std::time::Duration, mut ok: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if ok() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}
