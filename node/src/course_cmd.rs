//! Course staff's commands: `cdtester grades` (an evaluation's grades as CSV), `cdtester watch`
//! (an evaluation's progress from its server-sent events), `cdtester rerun` (the failed modules
//! of an evaluation, again) and the roster of
//! `cdtester submit --roster` (one `student,repository URL` row per project, each project named
//! after its student).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hyper::Method;
use serde::Serialize;

use crate::client::runtime;
use crate::ids::EvalId;
use crate::peer_http::client::HttpClient;

/// `cdtester grades`.
#[derive(Debug, Clone, clap::Args)]
pub struct GradesArgs {
    /// Evaluation id.
    pub id: EvalId,
    /// Write the CSV to this file instead of standard output.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// HTTP address of any node (config node.http).
    #[arg(long)]
    pub node: Option<SocketAddr>,
}

/// `cdtester grades`: fetches `GET /evaluation/{id}/grades.csv`.
pub fn grades(args: GradesArgs, default_node: SocketAddr) -> anyhow::Result<()> {
    let node = args.node.unwrap_or(default_node);
    let csv = runtime()?.block_on(async {
        HttpClient::new(Default::default(), None)
            .send(
                Method::GET,
                node,
                &format!("/evaluation/{}/grades.csv", args.id),
                None,
                Duration::from_secs(60),
            )
            .await
            .with_context(|| format!("fetching the grades of evaluation {}", args.id))
    })?;
    match &args.csv {
        Some(path) => {
            std::fs::write(path, &csv.body).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote the grades of evaluation {} to {}", args.id, path.display());
        }
        None => {
            use std::io::Write;
            std::io::stdout().write_all(&csv.body).context("writing to standard output")?;
        }
    }
    Ok(())
}

/// `cdtester watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Evaluation id.
    pub id: EvalId,
    /// HTTP address of any node (config node.http).
    #[arg(long)]
    pub node: Option<SocketAddr>,
}

/// One server-sent event: its `event` name and `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Takes the complete events (each ends with a blank line) off the front of `buf`.
pub fn take_events(buf: &mut String) -> Vec<SseEvent> {
    let mut out = Vec::new();
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let mut ev = SseEvent { event: "message".into(), data: String::new() };
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                ev.event = v.trim_start().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !ev.data.is_empty() {
                    ev.data.push('\n');
                }
                ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !ev.data.is_empty() {
            out.push(ev);
        }
    }
    out
}

/// A progress line of a `report` event.
fn progress_line(report: &serde_json::Value) -> String {
    let s = &report["summary"];
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    format!(
        "{}: {}/{} modules, {} running | {} passed, {} failed",
        report["status"].as_str().unwrap_or("?"),
        n("executed"),
        n("executed") + n("executing") + n("pending"),
        n("executing"),
        n("total_passed"),
        n("total_failed")
    )
}

/// `cdtester watch`: prints a line per change of `GET /evaluation/{id}/events` until the
/// evaluation is finished, then the graded table.
pub fn watch(args: WatchArgs, default_node: SocketAddr) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let node = args.node.unwrap_or(default_node);
    runtime()?.block_on(async {
        let stream =
            tokio::net::TcpStream::connect(node).await.with_context(|| format!("connecting to {node}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(conn);
        let req = hyper::Request::get(format!("/evaluation/{}/events", args.id))
            .header(hyper::header::HOST, node.to_string())
            .header(hyper::header::ACCEPT, "text/event-stream")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .context("building the request")?;
        let resp = sender.send_request(req).await.context("requesting the event stream")?;
        if !resp.status().is_success() {
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            bail!("{node} answered: {}", String::from_utf8_lossy(&body));
        }
        let mut body = resp.into_body();
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.context("reading the event stream")?.into_data() else { continue };
            buf.push_str(&String::from_utf8_lossy(&data));
            for ev in take_events(&mut buf) {
                match ev.event.as_str() {
                    "report" => {
                        println!("{}", progress_line(&serde_json::from_str(&ev.data).unwrap_or_default()))
                    }
                    "end" => {
                        let report = crate::client::Client::new(node).report(args.id).await?;
                        crate::client::print_table(&report);
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
        bail!("the event stream closed before the evaluation finished; run the command again")
    })
}

/// `cdtester rerun`.
#[derive(Debug, Clone, clap::Args)]
pub struct RerunArgs {
    /// Evaluation id (a finished evaluation).
    pub id: EvalId,
    /// Run the modules holding these tests (pytest node ids or module paths) instead of the
    /// modules with failed tests.
    #[arg(long = "test")]
    pub tests: Vec<String>,
    #[command(flatten)]
    pub follow: crate::client::Follow,
}

/// `cdtester rerun`: `POST /evaluation/{id}/rerun`.
pub fn rerun(args: RerunArgs, default_node: SocketAddr) -> anyhow::Result<()> {
    let node = args.follow.node.unwrap_or(default_node);
    let only =
        if args.tests.is_empty() { serde_json::json!("failed") } else { serde_json::json!(args.tests) };
    runtime()?.block_on(async {
        let v: serde_json::Value = HttpClient::new(Default::default(), None)
            .post_json(
                node,
                &format!("/evaluation/{}/rerun", args.id),
                &serde_json::json!({ "only": only }),
                Duration::from_secs(600),
            )
            .await
            .with_context(|| format!("rerunning evaluation {}", args.id))?;
        let id = crate::client::created_id(&v)?;
        let what = format!(" (rerun of {}): {}", args.id, v["modules"]);
        args.follow.submitted(&crate::client::Client::new(node), id, &what).await
    })
}

/// One project of a roster submission: `{"name": ..., "url": ...}` in `POST /evaluation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedProject {
    pub name: String,
    pub url: String,
}

/// A cell of a roster row: trimmed, without surrounding double quotes.
fn roster_cell(cell: &str) -> String {
    let t = cell.trim();
    t.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(t).replace("\"\"", "\"")
}

/// Parses a roster: one `student,repository URL` row per line; blank lines, `#` comments and a
/// header row (whose second cell is not a URL) are skipped. Student names must be unique.
pub fn parse_roster(text: &str) -> anyhow::Result<Vec<NamedProject>> {
    let mut out: Vec<NamedProject> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((student, url)) = line.rsplit_once(',') else {
            bail!("roster line {}: expected `student,repository URL`", i + 1);
        };
        let (name, url) = (roster_cell(student), roster_cell(url));
        if !url.contains("://") && !url.starts_with("git@") {
            if out.is_empty() && i == 0 {
                continue; // a header row
            }
            bail!("roster line {}: {url:?} is not a repository URL", i + 1);
        }
        if !crate::eval::valid_project_name(&name) {
            bail!(
                "roster line {}: {name:?} cannot name a project (empty, too long, or with / \\ or control characters)",
                i + 1
            );
        }
        if out.iter().any(|p| p.name == name) {
            bail!("roster line {}: student {name:?} is listed twice", i + 1);
        }
        out.push(NamedProject { name, url });
    }
    if out.is_empty() {
        bail!("the roster lists no student");
    }
    Ok(out)
}

/// Reads and parses a roster file.
pub fn read_roster(path: &Path) -> anyhow::Result<Vec<NamedProject>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_roster(&text).with_context(|| format!("in {}", path.display()))
}

/// Submits a roster's repositories as one evaluation; returns its id.
pub async fn submit_roster(
    node: SocketAddr,
    projects: &[NamedProject],
    token: Option<&str>,
) -> anyhow::Result<EvalId> {
    let body = serde_json::json!({ "auth_token": token, "projects": projects });
    let v: serde_json::Value = HttpClient::new(Default::default(), None)
        .post_json(node, "/evaluation", &body, Duration::from_secs(600))
        .await
        .context("submitting the roster")?;
    crate::client::created_id(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_taken_whole_and_partial_ones_kept() {
        let mut buf = String::from("event: report\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: end\nda");
        assert_eq!(
            take_events(&mut buf),
            vec![SseEvent { event: "report".into(), data: "{\"a\":1}".into() }]
        );
        assert_eq!(buf, "event: end\nda");
        buf.push_str("ta: x\ndata: y\n\n");
        assert_eq!(take_events(&mut buf), vec![SseEvent { event: "end".into(), data: "x\ny".into() }]);
        assert!(buf.is_empty());
    }

    #[test]
    fn roster_rows_skip_header_comments_and_blank_lines() {
        let text = "\u{feff}student,repository\n# week 3\nalice, https://git.example/a/calc.git\n\n\"Bob, Jr\",git@example.com:b/calc.git\n";
        let r = parse_roster(text).unwrap();
        assert_eq!(
            r,
            vec![
                NamedProject { name: "alice".into(), url: "https://git.example/a/calc.git".into() },
                NamedProject { name: "Bob, Jr".into(), url: "git@example.com:b/calc.git".into() },
            ]
        );
    }

    #[test]
    fn roster_refuses_bad_names_duplicates_and_non_urls() {
        assert!(parse_roster("alice,https://x/a\nalice,https://x/b").is_err());
        assert!(parse_roster("../etc,https://x/a").is_err());
        assert!(parse_roster("a/b,https://x/a").is_err());
        assert!(parse_roster("alice,https://x/a\nbob,not a url").is_err());
        assert!(parse_roster("student,repository\n").is_err());
    }
}
