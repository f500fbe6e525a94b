//! Issue 9, intake (H5, M2, M3, M4, L5), attacked against real `cdtester node` processes on
//! 127.0.0.1 as a client of the public API would:
//! - local paths, relative paths and `file://` URLs are refused over HTTP (nothing is cloned,
//!   nothing is stored, `GET /file` serves nothing);
//! - a tarpit git server fails the submission within `intake.clone_timeout_s` while the API keeps
//!   answering, and clones beyond `intake.max_concurrent_clones` are refused at once (503);
//! - a repository that expands past `intake.max_tree_bytes` is refused before checkout;
//! - a zip whose central directory is huge is refused before it is parsed, and an upload over
//!   `intake.max_upload_bytes` gets 413, with the node's peak memory bounded;
//! - 2,000 half-sent requests do not stop the API from answering;
//! - a URL's query string (`?access_token=...`) is never stored or reported.

mod common;
mod node_common;

use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use node_common::{call, get, submit_urls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1024 * 1024;

fn error_text(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or_else(|| panic!("no error message: {v}")).to_string()
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM` = peak RSS).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// A git repository (one commit) holding `files`.
fn git_repo(dir: &Path, files: &[(&str, &[u8])]) {
    for (rel, data) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    let repo = git2::Repository::init(dir).expect("git init");
    let mut index = repo.index().unwrap();
    index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("t", "t@example.com").unwrap();
    repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[]).unwrap();
}

/// A git:// server for `repo`: answers every request with `git upload-pack` on it, whatever
/// path (and query) the client asks for. Returns its address.
async fn git_daemon(repo: std::path::PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let repo = repo.clone();
            tokio::spawn(async move {
                // The request: one pkt-line "git-upload-pack /path\0host=...\0".
                let mut len = [0u8; 4];
                sock.read_exact(&mut len).await.ok()?;
                let n = usize::from_str_radix(std::str::from_utf8(&len).ok()?, 16).ok()?;
                let mut req = vec![0u8; n.checked_sub(4)?];
                sock.read_exact(&mut req).await.ok()?;
                let mut child = tokio::process::Command::new("git")
                    .arg("upload-pack")
                    .arg(&repo)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .ok()?;
                let (mut stdin, mut stdout) = (child.stdin.take()?, child.stdout.take()?);
                let (mut rd, mut wr) = sock.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut rd, &mut stdin).await });
                let _ = tokio::io::copy(&mut stdout, &mut wr).await;
                up.abort();
                let _ = child.wait().await;
                Some(())
            });
        }
    });
    addr
}

/// A TCP server that accepts connections and never sends a byte (a tarpit).
async fn tarpit() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    addr
}

/// `GET /stats` answers within `within`.
async fn answers_quickly(http: SocketAddr, within: Duration) {
    let t = Instant::now();
    let r = node_common::client().send(Method::GET, http, "/stats", None, within).await;
    assert!(r.as_ref().is_ok_and(|r| r.status == StatusCode::OK), "GET /stats: {r:?}");
    assert!(t.elapsed() <= within, "GET /stats took {:?}", t.elapsed());
}

/// Nothing was submitted, and the node's work folder is empty (at once, or within a few
/// seconds when a clone that outlived its answer is still stopping).
async fn nothing_stored(http: SocketAddr, data_dir: &Path) {
    let (s, v) = get(http, "/evaluation").await;
    assert_eq!((s, v.clone()), (StatusCode::OK, serde_json::json!([])), "{v}");
    let (_, v) = get(http, "/stats").await;
    assert_eq!(node_common::stats_all(&v), (0, 0, 0, 0), "{v}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<_> =
            std::fs::read_dir(data_dir.join("work")).unwrap().map(|e| e.unwrap().path()).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "work folder not cleaned: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_paths_and_file_urls_are_refused_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let secret_repo = dir.path().join("private").join("secrets");
    git_repo(&secret_repo, &[("key.txt", b"the operator's private key\n")]);
    let c = node_common::cluster(1, &dir.path().join("nodes"), &[]).await;
    let (http, data) = (c.nodes[0].http, c.nodes[0].data_dir.clone());
    let relative = pathdiff(&secret_repo, &std::env::current_dir().unwrap());
    for url in [
        secret_repo.display().to_string(),
        relative,
        "secrets".to_string(),
        format!("file://{}", secret_repo.display()),
        format!("FILE://{}", secret_repo.display()),
        "git://127.0.0.1:9/x.git".into(),
        "http://127.0.0.1:9/x.git".into(),
        "ssh://git@127.0.0.1/x.git".into(),
        "git@127.0.0.1:x.git".into(),
    ] {
        let (s, v) = submit_urls(http, std::slice::from_ref(&url)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{url}: {v}");
        let e = error_text(&v);
        assert!(e.contains("not accepted") || e.contains("only https://"), "{url}: {v}");
        assert!(!e.contains("private key"), "{v}");
    }
    // A local path mixed with a valid URL: the whole submission is refused before any clone.
    let (s, v) =
        submit_urls(http, &["https://127.0.0.1:9/x.git".into(), secret_repo.display().to_string()]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // URLs per submission are capped.
    let many: Vec<String> = (0..17).map(|i| format!("https://127.0.0.1:9/{i}.git")).collect();
    let (s, v) = submit_urls(http, &many).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("at most 16"), "{v}");

    nothing_stored(http, &data).await;
    for guess in ["0-0", "1-0", "secrets"] {
        // Asked as a member (archives are member-only), nothing is there to serve.
        let (s, v) = node_common::get_internal(&c, 0, &format!("/file/{guess}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "/file/{guess}: {v}");
    }
}

/// `target` relative to `from` (`../../x/y`).
fn pathdiff(target: &Path, from: &Path) -> String {
    let common = target.ancestors().find(|a| from.starts_with(a)).expect("common ancestor");
    let ups = from.strip_prefix(common).unwrap().components().count();
    let rest = target.strip_prefix(common).unwrap();
    format!("{}{}", "../".repeat(ups), rest.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tarpits_time_out_clones_are_capped_and_the_api_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let c = node_common::cluster(
        1,
        &dir.path().join("nodes"),
        &[
            ("CDT_INTAKE__ALLOW_GIT_PROTOCOL", "true"),
            ("CDT_INTAKE__CLONE_TIMEOUT_S", "3"),
            ("CDT_INTAKE__MAX_CONCURRENT_CLONES", "2"),
        ],
    )
    .await;
    let (http, data) = (c.nodes[0].http, c.nodes[0].data_dir.clone());
    let pit = tarpit().await;
    let started = Instant::now();
    let mut stuck = Vec::new();
    for url in [format!("git://{pit}/x.git"), format!("https://{pit}/x.git?access_token=s3cr3t")] {
        stuck.push(tokio::spawn(async move {
            let r = submit_urls(http, &[url]).await;
            (r, started.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both clone slots are taken: a third submission is refused at once, not queued.
    let t = Instant::now();
    let (s, v) = submit_urls(http, &[format!("git://{pit}/third.git")]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(t.elapsed() < Duration::from_secs(2), "refusal took {:?}", t.elapsed());
    // The API keeps answering while the clones hang.
    answers_quickly(http, Duration::from_secs(2)).await;
    for job in stuck {
        let ((s, v), took) = job.await.unwrap();
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(took < Duration::from_secs(3 + 3), "the tarpit held the request {took:?}: {v}");
        let e = error_text(&v);
        assert!(!e.contains("s3cr3t") && !e.contains("access_token"), "query leaked: {v}");
    }
    // The slots come back once the clones have stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s, v) = submit_urls(http, &[format!("git://{pit}/again.git")]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    nothing_stored(http, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_expanding_past_the_tree_cap_is_refused_before_checkout() {
    let dir = tempfile::tempdir().unwrap();
    // 64 MiB of zeros: a few hundred KiB over the wire.
    let bomb = dir.path().join("bomb");
    let zeros = vec![0u8; 64 * MIB as usize];
    git_repo(&bomb, &[("tests/test_a.py", b"def test_a(): pass\n"), ("data.bin", &zeros)]);
    drop(zeros);
    let c = node_common::cluster(
        1,
        &dir.path().join("nodes"),
        &[("CDT_INTAKE__ALLOW_GIT_PROTOCOL", "true"), ("CDT_INTAKE__MAX_TREE_BYTES", "16777216")],
    )
    .await;
    let (http, data) = (c.nodes[0].http, c.nodes[0].data_dir.clone());
    let pid = c.nodes[0].pid().unwrap();
    let daemon = git_daemon(bomb).await;
    let before = proc_kib(pid, "VmRSS");
    let (s, v) = submit_urls(http, &[format!("git://{daemon}/bomb.git")]).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(error_text(&v).contains("expands to more than 16777216 bytes"), "{v}");
    let peak = proc_kib(pid, "VmHWM");
    eprintln!("expanding repository: node RSS {before} KiB before, peak {peak} KiB");
    assert!(peak < before + 48 * 1024, "peak RSS {peak} KiB, {before} KiB before");
    nothing_stored(http, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_and_reported_urls_have_no_query_or_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("calc");
    git_repo(&repo, &[("tests/test_a.py", b"def test_a():\n    assert 1 + 1 == 2\n")]);
    let c = node_common::cluster(1, &dir.path().join("nodes"), &[("CDT_INTAKE__ALLOW_GIT_PROTOCOL", "true")])
        .await;
    let http = c.nodes[0].http;
    let daemon = git_daemon(repo).await;
    let url = format!("git://user:pw@{daemon}/calc.git?access_token=s3cr3t#frag");
    let (s, v) = submit_urls(http, &[url]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["eval_id"].as_u64().unwrap();
    let r = node_common::wait_finished(http, id, Duration::from_secs(180)).await;
    assert_eq!(
        r["projects"]["calc"]["url"].as_str(),
        Some(format!("git://{daemon}/calc.git").as_str()),
        "{r}"
    );
    assert_eq!(r["projects"]["calc"]["tests"]["passed"].as_u64(), Some(1), "{r}");
    let everything = format!("{r}{}", node_common::get_raw(http, "/evaluation").await);
    for leaked in ["s3cr3t", "access_token", "pw@", "frag"] {
        assert!(!everything.contains(leaked), "{leaked} in {everything}");
    }
}

/// A zip whose central directory lists `entries` empty files (each `p/<n>`) and nothing else:
/// the directory alone is what a parser would load. Zip64 records when the count needs them.
fn write_central_directory_zip(path: &Path, entries: u64) {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut cd_size = 0u64;
    for i in 0..entries {
        let name = format!("p/{i:08}");
        let mut h = Vec::with_capacity(46 + name.len());
        h.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        h.extend_from_slice(&[20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // versions, flags, stored, time/date
        h.extend_from_slice(&[0u8; 12]); // crc, sizes
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&[0u8; 8]); // extra, comment, disk, internal attributes
        h.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        h.extend_from_slice(&0u32.to_le_bytes()); // local header offset
        h.extend_from_slice(name.as_bytes());
        cd_size += h.len() as u64;
        w.write_all(&h).unwrap();
    }
    let zip64 = entries > 0xFFFF;
    if zip64 {
        let mut r = Vec::new();
        r.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        r.extend_from_slice(&44u64.to_le_bytes());
        r.extend_from_slice(&[45, 3, 45, 0]);
        r.extend_from_slice(&[0u8; 8]); // disks
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&entries.to_le_bytes());
        r.extend_from_slice(&cd_size.to_le_bytes());
        r.extend_from_slice(&0u64.to_le_bytes()); // directory offset
        r.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&cd_size.to_le_bytes()); // the zip64 record follows the directory
        r.extend_from_slice(&1u32.to_le_bytes());
        w.write_all(&r).unwrap();
    }
    let short = |n: u64| if zip64 { 0xFFFF } else { n as u16 };
    let mut e = Vec::new();
    e.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    e.extend_from_slice(&[0u8; 4]);
    e.extend_from_slice(&short(entries).to_le_bytes());
    e.extend_from_slice(&short(entries).to_le_bytes());
    e.extend_from_slice(&(if zip64 { u32::MAX } else { cd_size as u32 }).to_le_bytes());
    e.extend_from_slice(&(if zip64 { u32::MAX } else { 0 }).to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    w.write_all(&e).unwrap();
    w.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_central_directories_and_oversized_uploads_are_refused_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let c =
        node_common::cluster(1, &dir.path().join("nodes"), &[("CDT_INTAKE__MAX_UPLOAD_BYTES", "134217728")])
            .await;
    let (http, data) = (c.nodes[0].http, c.nodes[0].data_dir.clone());
    let pid = c.nodes[0].pid().unwrap();
    let before = proc_kib(pid, "VmRSS");

    // 2 million entries (a 100+ MiB directory), and a 60,000-entry zip32 one.
    for (entries, expected) in
        [(2_000_000u64, "more than 50000 entries"), (60_000, "more than 50000 entries")]
    {
        let path = dir.path().join(format!("cd-{entries}.zip"));
        write_central_directory_zip(&path, entries);
        let zip = std::fs::read(&path).unwrap();
        let (ct, body) = cdtester::peer_http::client::multipart_file("file", "x.zip", &zip);
        drop(zip);
        let t = Instant::now();
        let (s, v) = call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{entries}: {v}");
        assert!(error_text(&v).contains(expected), "{entries}: {v}");
        assert!(t.elapsed() < Duration::from_secs(30), "{entries}: {:?}", t.elapsed());
    }
    // A directory within the entry cap but over the directory-size cap (long names).
    let long = dir.path().join("long.zip");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&long).unwrap());
        let name = "n".repeat(60_000);
        for i in 0..300 {
            z.add_directory(format!("{i}/{name}"), zip::write::SimpleFileOptions::default()).unwrap();
        }
        z.finish().unwrap();
    }
    let (ct, body) =
        cdtester::peer_http::client::multipart_file("file", "x.zip", &std::fs::read(&long).unwrap());
    let (s, v) = call(http, Method::POST, "/evaluation", Some((&ct, body))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_text(&v).contains("central directory is larger than"), "{v}");

    // Over the upload cap, declared (413 before the body is read) and undeclared (chunked: the
    // node stops reading at the cap and says 413).
    for chunked in [false, true] {
        let status = raw_upload(http, 160 * MIB, chunked).await;
        assert!(status.starts_with("HTTP/1.1 413"), "chunked {chunked}: {status}");
    }

    let peak = proc_kib(pid, "VmHWM");
    eprintln!("huge directories and oversized uploads: node RSS {before} KiB before, peak {peak} KiB");
    assert!(peak < before + 64 * 1024, "peak RSS {peak} KiB, {before} KiB before the uploads");
    answers_quickly(http, Duration::from_secs(2)).await;
    nothing_stored(http, &data).await;
}

/// Streams a multipart upload of `size` bytes, with its length declared or with chunked
/// encoding, and returns the status line of the answer (read while the body is still sent).
async fn raw_upload(http: SocketAddr, size: u64, chunked: bool) -> String {
    let sock = TcpStream::connect(http).await.unwrap();
    let (mut rd, mut wr) = sock.into_split();
    let writer = tokio::spawn(async move {
        let part = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.zip\"\r\n\r\n";
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {}", part.len() as u64 + size)
        };
        let head = format!(
            "POST /evaluation HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n{framing}\r\n\r\n"
        );
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'z'; MIB as usize];
        for piece in std::iter::once(&part[..]).chain((0..size / MIB).map(|_| &chunk[..])) {
            if chunked {
                wr.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
            }
            wr.write_all(piece).await?;
            if chunked {
                wr.write_all(b"\r\n").await?;
            }
        }
        if chunked {
            wr.write_all(b"0\r\n\r\n").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_secs(60), rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("no answer to the chunked upload: {other:?}"),
        }
    }
    writer.abort();
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_do_not_take_the_api_down() {
    let dir = tempfile::tempdir().unwrap();
    let c =
        node_common::cluster(1, &dir.path().join("nodes"), &[("CDT_INTAKE__HEADER_TIMEOUT_S", "4")]).await;
    let http = c.nodes[0].http;
    let pid = c.nodes[0].pid().unwrap();
    let mut held = Vec::new();
    for _ in 0..2_500 {
        let Ok(mut s) = TcpStream::connect(http).await else { continue };
        let _ = s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n").await;
        held.push(s);
    }
    assert!(held.len() >= 2_000, "only {} connections opened", held.len());
    // The API still answers, at once, while the connections are held.
    for _ in 0..5 {
        answers_quickly(http, Duration::from_secs(3)).await;
    }
    // The node never holds more connections than its cap.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert!(fds < 512 + 128, "the node holds {fds} descriptors");
    // Half-sent requests are closed after the header timeout.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut closed = 0;
    for s in held.iter_mut().rev().take(200) {
        let mut b = [0u8; 256];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), s.read(&mut b)).await {
            // EOF, or a 408 answer before the close.
            if n == 0 || b.starts_with(b"HTTP/1.1 408") {
                closed += 1;
            }
        }
    }
    assert!(closed >= 190, "only {closed} of the 200 newest half-sent requests were closed");
    answers_quickly(http, Duration::from_secs(3)).await;
}
