//! The dashboard in headless Chromium (Debian's `chromium`, which `tests/run` installs) against
//! a real 3-node network with a running evaluation, driven over the DevTools protocol
//! (`--remote-debugging-pipe`: NUL-separated JSON on file descriptors 3 and 4):
//! the page lists the 3 nodes; the project table changes while tests run without the page being
//! reloaded; with `runner.retries = 1` a test failing once is listed as flaky and its
//! drill-down shows both attempts; a click on a project shows its modules and tests with a
//! failure message; the failed-only filter hides passing projects; a click on the grades link
//! downloads the same CSV as `GET /evaluation/{id}/grades.csv`; "rerun failed" opens a new evaluation of the failing
//! projects, links back to the evaluation it reruns and, once finished, shows a failing test's
//! history (its run in each evaluation). Without a Chromium binary the test prints `SKIPPED`.
//! With `DASHBOARD_SCREENSHOTS=<dir>` it saves screenshots of the pages there (the README's).

mod common;
mod node_common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The Chromium binary: `$CHROMIUM_BIN`, else the first of the usual names on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

/// A headless browser and one page, over the DevTools protocol.
struct Browser {
    child: Child,
    to: std::io::PipeWriter,
    from: BufReader<std::io::PipeReader>,
    next: u64,
    session: String,
}

impl Browser {
    fn launch(exe: &Path, profile: &Path) -> Browser {
        let (to_read, to) = std::io::pipe().expect("pipe");
        let (from, from_write) = std::io::pipe().expect("pipe");
        let (r, w) = (to_read.as_raw_fd(), from_write.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--window-size=1280,860",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec; the
        // descriptors are open in the parent until the child is spawned.
        unsafe {
            cmd.pre_exec(move || {
                let (a, b) = (libc::fcntl(r, libc::F_DUPFD, 10), libc::fcntl(w, libc::F_DUPFD, 10));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((to_read, from_write));
        let mut b = Browser { child, to, from: BufReader::new(from), next: 0, session: String::new() };
        let target = b.call(false, "Target.createTarget", json!({"url": "about:blank"}));
        let attached =
            b.call(false, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true}));
        b.session = attached["sessionId"].as_str().expect("session id").to_string();
        b
    }

    /// One command (on the page when `page`, else on the browser); its result.
    fn call(&mut self, page: bool, method: &str, params: Value) -> Value {
        self.next += 1;
        let mut msg = json!({"id": self.next, "method": method, "params": params});
        if page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        loop {
            let mut buf = Vec::new();
            let n = self.from.read_until(0, &mut buf).expect("read from chromium");
            assert!(n > 0, "chromium closed the DevTools pipe");
            buf.pop();
            let v: Value = serde_json::from_slice(&buf).expect("DevTools JSON");
            if v["id"] == self.next {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            true,
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Polls `expr` until `ok` accepts its value.
    fn wait_for(&mut self, what: &str, expr: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr);
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: still {v} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the row of project `name` (opens or closes its drill-down).
    fn click_project(&mut self, name: &str) {
        self.eval(&format!("document.querySelector('tr.project[data-project=\"{name}\"]').click()"));
    }

    /// Opens project `name`'s drill-down and waits (30 s at most) until `expr` satisfies `ok`.
    fn open_project(&mut self, name: &str, what: &str, expr: &str, ok: impl Fn(&Value) -> bool) -> Value {
        self.click_project(name);
        self.wait_for(what, expr, Duration::from_secs(30), ok)
    }

    /// Saves a PNG of the page under `$DASHBOARD_SCREENSHOTS`, when set.
    fn screenshot(&mut self, name: &str) {
        let Some(dir) = std::env::var_os("DASHBOARD_SCREENSHOTS") else { return };
        let shot = self.call(true, "Page.captureScreenshot", json!({"format": "png"}));
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        std::fs::create_dir_all(&dir).expect("screenshot folder");
        std::fs::write(Path::new(&dir).join(name), png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64 digit") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A test that fails on its first run in a project copy (it leaves a marker) and passes after.
const FAILS_ONCE: &str = "import os\n\nMARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), '.ran')\n\n\
    def test_once():\n    if not os.path.exists(MARK):\n        open(MARK, 'w').close()\n        \
    assert False, 'first run'\n";

const PROJECT_ROWS: &str =
    "[...document.querySelectorAll('#projects tbody tr.project')].map(r => r.innerText).join('\\n')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_on_three_nodes() {
    let Some(exe) = chromium() else {
        eprintln!(
            "SKIPPED dashboard_browser: no chromium binary (apt-get install chromium, or set CHROMIUM_BIN)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let c = node_common::cluster(3, &dir.path().join("nodes"), &[("CDT_RUNNER__RETRIES", "1")]).await;
    let http = c.nodes[0].http;
    let demo = dir.path().join("demo");
    cdtester::demo::write_examples(&demo).expect("examples");
    let sleepy = dir.path().join("sleepy");
    node_common::sleepy_project(&sleepy, 6, 3, 2.0);
    let flaky = dir.path().join("flaky");
    common::write_file(&flaky, "tests/test_once.py", FAILS_ONCE);
    let zip = node_common::zip_projects(&[
        ("sleepy", sleepy),
        ("flaky", flaky),
        ("calc", demo.join("calc")),
        ("strs", demo.join("strs")),
        ("shapes", demo.join("shapes")),
    ]);
    let id = node_common::submit_zip(http, &zip).await;
    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();

    let page = format!("http://{http}/#/evaluation/{id}");
    let profile = dir.path().join("profile");
    let (seen, finished_rows, msg, modules, shown, href, csv, rerun_id) = tokio::task::spawn_blocking({
        let downloads = downloads.clone();
        move || {
            let mut b = Browser::launch(&exe, &profile);
            b.call(
                false,
                "Browser.setDownloadBehavior",
                json!({"behavior": "allow", "downloadPath": downloads}),
            );
            b.call(true, "Page.navigate", json!({"url": page}));
            b.wait_for(
                "network table",
                "document.querySelectorAll('#network-table tbody tr').length",
                Duration::from_secs(30),
                |v| v == 3,
            );
            b.eval("window.cdtMarker = 42");
            // The project table while the evaluation runs: every distinct state it shows.
            let mut seen: Vec<String> = Vec::new();
            let mut shot = false;
            let deadline = Instant::now() + Duration::from_secs(300);
            while b.eval("document.getElementById('eval-status').textContent") != "finished" {
                let rows = b.eval(PROJECT_ROWS).as_str().unwrap_or_default().to_string();
                if !rows.is_empty() && seen.last() != Some(&rows) {
                    seen.push(rows);
                }
                if !shot
                    && b.eval("parseInt(document.getElementById('eval-progress').style.width) >= 40") == true
                {
                    b.screenshot("dashboard-running.png");
                    shot = true;
                }
                assert!(Instant::now() < deadline, "the page never showed the evaluation finished");
                std::thread::sleep(Duration::from_millis(250));
            }
            assert_eq!(b.eval("window.cdtMarker"), 42, "the page was reloaded");
            let finished_rows = b.eval(PROJECT_ROWS);
            // With runner.retries = 1 the test failing once is listed as flaky, and its drill-down
            // shows both attempts.
            let flaky = b.eval("[...document.querySelectorAll('#flaky-table tbody tr')].map(r => r.dataset.flaky)");
            assert_eq!(flaky, json!(["tests/test_once.py::test_once"]));
            assert_eq!(b.eval("document.getElementById('flaky-section').hidden"), false);
            b.open_project(
                "flaky",
                "attempts",
                "[...document.querySelectorAll('tr.detail tr.t-flaky .attempts span')].map(s => s.className).join(' ')",
                |v| v == "o-failed o-passed",
            );
            b.screenshot("dashboard-flaky.png");
            b.click_project("flaky");
            // Drill-down: modules and tests of `sleepy`, with its failure message.
            let msg = b.open_project(
                "sleepy",
                "failure message",
                "[...document.querySelectorAll('tr.detail .message')].map(m => m.textContent).join('|')",
                |v| v.as_str().is_some_and(|s| s.contains("assert 1 == 2")),
            );
            let modules = b.eval("document.querySelectorAll('tr.detail .module').length");
            b.screenshot("dashboard-drilldown.png");
            // Failed only: the projects shown are those with failures or errors.
            b.eval("document.getElementById('failed-only').click()");
            let shown = b.eval(
                "[...document.querySelectorAll('#projects tbody tr.project')].map(r => r.dataset.project)",
            );
            // The grades link downloads the CSV.
            let href = b.eval("document.getElementById('grades-link').getAttribute('href')");
            b.eval("document.getElementById('grades-link').click()");
            // The browser must stay open until the download is complete.
            let file = downloads.join(format!("grades-{id}.csv"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !file.is_file() {
                let listed: Vec<_> = std::fs::read_dir(&downloads).into_iter().flatten().flatten().collect();
                assert!(Instant::now() < deadline, "no download of {} ({listed:?})", file.display());
                std::thread::sleep(Duration::from_millis(200));
            }
            let csv = std::fs::read_to_string(&file).expect("downloaded CSV");
            // "rerun failed" opens the new evaluation's page.
            b.eval("document.getElementById('rerun').click()");
            let first = format!("#/evaluation/{id}");
            let hash = b.wait_for("rerun navigation", "location.hash", Duration::from_secs(30), |v| {
                v.as_str().is_some_and(|h| h.starts_with("#/evaluation/") && h != first)
            });
            let rerun_id: u64 =
                hash.as_str().and_then(|h| h.rsplit('/').next()?.parse().ok()).expect("rerun id");
            b.wait_for(
                "rerun page",
                "document.getElementById('eval-id').textContent",
                Duration::from_secs(30),
                |v| v.as_str() == Some(rerun_id.to_string().as_str()),
            );
            // The rerun links to the evaluation it came from.
            b.wait_for(
                "rerun link",
                "[...document.querySelectorAll('#eval-links a')].map(a => a.textContent).join(' ')",
                Duration::from_secs(30),
                |v| v.as_str() == Some(format!("#{id}").as_str()),
            );
            // Once it ran, a failing test of `sleepy` shows its two runs (both evaluations).
            b.wait_for(
                "rerun finished",
                "document.getElementById('eval-status').textContent",
                Duration::from_secs(300),
                |v| v == "finished",
            );
            b.open_project(
                "sleepy",
                "test history",
                "document.querySelectorAll('tr.detail tr[data-test=\"tests/test_m0.py::test_2\"] .history .run.o-failed').length",
                |v| v == 2,
            );
            b.screenshot("dashboard-history.png");
            (seen, finished_rows, msg, modules, shown, href, csv, rerun_id)
        }
    })
    .await
    .expect("browser session");
    eprintln!("the project table showed {} states while running; failure messages: {msg}", seen.len());
    assert!(seen.len() >= 2, "the table did not change while tests ran: {seen:?}");
    assert_ne!(
        seen.first().map(|s| Value::String(s.clone())),
        Some(finished_rows),
        "no update after the first state"
    );
    assert_eq!(modules, 6, "the drill-down lists sleepy's 6 modules");

    let (_, report) = node_common::get(http, &format!("/evaluation/{id}")).await;
    let failing: Vec<Value> = report["projects"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, p)| p["total_failed"].as_u64().unwrap_or(0) > 0 || p["status"] == "failed")
        .map(|(n, _)| Value::String(n.clone()))
        .collect();
    assert_eq!(shown, Value::Array(failing), "failed-only filter");
    assert!(
        report["projects"].as_object().unwrap().len() > shown.as_array().unwrap().len(),
        "a passing project"
    );

    assert_eq!(href, format!("/evaluation/{id}/grades.csv"));
    let expected = node_common::get_raw(http, &format!("/evaluation/{id}/grades.csv")).await;
    assert_eq!(csv, expected, "the downloaded CSV");
    // The rerun holds the failing projects only.
    let (_, rerun) = node_common::get(http, &format!("/evaluation/{rerun_id}?tests=false")).await;
    let names: Vec<Value> =
        rerun["projects"].as_object().expect("projects").keys().map(|k| json!(k)).collect();
    assert_eq!(Value::Array(names), shown, "{rerun}");
}
