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

/// The first project of a report (`cdtester run --json`, `status --json`: projects by name).
pub fn first_project(report: &serde_json::Value) -> &serde_json::Value {
    report["projects"]
        .as_object()
        .and_then(|m| m.values().next())
        .unwrap_or_else(|| panic!("no project in {report:#}"))
}

/// Fetches (sha256-checked, cached) and unpacks the named corpus projects under `into`, one
/// folder per project.
pub fn fetch_corpus(names: &[&str], into: &Path) -> Vec<cdtester::corpus::CorpusProject> {
    let all = cdtester::corpus::shipped().expect("corpus manifest");
    let python = cdtester_runners::local::resolve_python(None).expect("python3");
    names
        .iter()
        .map(|name| {
            let p = all
                .iter()
                .find(|p| p.name == *name)
                .unwrap_or_else(|| panic!("{name} not in the corpus"))
                .clone();
            let sdist =
                cdtester::corpus::fetch(&p, &python, &corpus_cache()).unwrap_or_else(|e| panic!("{e}"));
            cdtester::corpus::unpack(&p, &sdist, into).unwrap_or_else(|e| panic!("{e}"));
            p
        })
        .collect()
}

/// A config file giving each project its test requirements, as an operator would write it.
pub fn write_requirement_config(projects: &[cdtester::corpus::CorpusProject], path: &Path) {
    let mut text = String::new();
    for rule in cdtester::corpus::requirement_rules(projects) {
        let reqs: Vec<String> = rule.requirements.iter().map(|r| format!("{r:?}")).collect();
        text.push_str(&format!(
            "[[projects]]\npattern = {:?}\nrequirements = [{}]\n\n",
            rule.pattern,
            reqs.join(", ")
        ));
    }
    std::fs::write(path, text).expect("write config");
}

/// A `cdtester run --json --junit-xml` of corpus projects: where they are, their config file,
/// the projects, the JUnit file and the run's output.
pub struct CorpusRun {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub projects: Vec<cdtester::corpus::CorpusProject>,
    pub junit: PathBuf,
    pub out: Output,
}

/// Fetches the named corpus projects under `<work>/projects` (one folder each), writes a config
/// file `<work>/cdtester.toml` giving them their test requirements, and runs
/// `cdtester --config <it> run --json --junit-xml <work>/<name>.xml` on the folder with its
/// data in `<work>/<name>-data` (asserting that it succeeds).
pub fn corpus_run(names: &[&str], work: &Path, name: &str) -> CorpusRun {
    let dir = work.join("projects");
    let projects = fetch_corpus(names, &dir);
    let config = work.join("cdtester.toml");
    write_requirement_config(&projects, &config);
    let junit = work.join(format!("{name}.xml"));
    let out = output(
        cdtester(&work.join(format!("{name}-data")))
            .arg("--config")
            .arg(&config)
            .args(["run", "--json", "--junit-xml"])
            .arg(&junit)
            .arg(&dir),
    );
    assert!(out.status.success(), "{}", describe(&out));
    CorpusRun { dir, config, projects, junit, out }
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
