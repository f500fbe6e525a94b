//! The command-line client of a node's HTTP API: `cdtester submit`, `cdtester status`,
//! `cdtester list`, with a live progress bar and the graded table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::eval::{EvalReport, EvalStatus};
use crate::fetch;
use crate::ids::EvalId;
use crate::peer_http::auth::Secret;
use crate::peer_http::client::{HttpClient, multipart_file};

/// The variable holding the token for https git URLs. Only the environment carries it: a
/// command-line argument would be visible to every user of the machine (`ps`).
pub const TOKEN_VAR: &str = "CDT_GIT_TOKEN";

/// `cdtester submit`. The token for https git URLs, if any, is read from `CDT_GIT_TOKEN`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "The token for https git URLs, if any, is read from the environment variable \
                        CDT_GIT_TOKEN (never from the command line, where other users see it).")]
pub struct SubmitArgs {
    /// Project folders (one project, or a folder of project folders), zip files, or git URLs.
    #[arg(required_unless_present = "roster")]
    pub sources: Vec<String>,
    /// A CSV file of `student,repository URL` rows: one evaluation whose projects are named
    /// after the students.
    #[arg(long)]
    pub roster: Option<PathBuf>,
    #[command(flatten)]
    pub follow: Follow,
}

/// Where a submission goes and how its outcome is shown (`submit`, `rerun`).
#[derive(Debug, Clone, clap::Args)]
pub struct Follow {
    /// HTTP address of any node (config node.http).
    #[arg(long)]
    pub node: Option<SocketAddr>,
    /// Wait for the evaluation to finish, showing progress, then print the results.
    #[arg(long)]
    pub wait: bool,
    /// Print the final report as JSON (with --wait).
    #[arg(long)]
    pub json: bool,
    /// Also write the final report as JUnit XML to FILE (with --wait), as `cdtester run` does.
    #[arg(long, value_name = "FILE", requires = "wait")]
    pub junit_xml: Option<PathBuf>,
}

impl Follow {
    /// Says that `id` was submitted (`what` adds to the line), then, with `--wait`, waits for it
    /// and prints its report.
    pub async fn submitted(&self, client: &Client, id: EvalId, what: &str) -> anyhow::Result<()> {
        if !self.json {
            println!("submitted: evaluation {id}{what}");
        }
        if self.wait {
            let r = client.wait(id, self.json).await?;
            if let Some(path) = &self.junit_xml {
                std::fs::write(path, crate::render::junit_xml(&r))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if self.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_table(&r);
            }
        }
        Ok(())
    }
}

/// `cdtester status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Evaluation id.
    pub id: EvalId,
    /// HTTP address of any node (config node.http).
    #[arg(long)]
    pub node: Option<SocketAddr>,
    /// Print the whole report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cdtester list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// HTTP address of any node (config node.http).
    #[arg(long)]
    pub node: Option<SocketAddr>,
}

const TIMEOUT: Duration = Duration::from_secs(600);

/// A client of one node's API.
pub struct Client {
    http: HttpClient,
    node: SocketAddr,
}

fn is_url(s: &str) -> bool {
    s.contains("://") || s.starts_with("git@")
}

impl Client {
    pub fn new(node: SocketAddr) -> Client {
        Client { http: HttpClient::new(Secret::default(), None), node }
    }

    /// Submits a zip upload; returns the evaluation id.
    pub async fn submit_zip(&self, zip: Vec<u8>, filename: &str) -> anyhow::Result<EvalId> {
        let (ct, body) = multipart_file("file", filename, &zip);
        let resp = self.http.send(Method::POST, self.node, "/evaluation", Some((&ct, body)), TIMEOUT).await?;
        eval_id(&resp.body)
    }

    /// Submits git URLs; returns the evaluation id.
    pub async fn submit_urls(&self, urls: &[String], token: Option<&str>) -> anyhow::Result<EvalId> {
        let body = serde_json::json!({ "auth_token": token, "projects": urls });
        created_id(&self.http.post_json(self.node, "/evaluation", &body, TIMEOUT).await?)
    }

    /// The full report (with per-test results).
    pub async fn report(&self, id: EvalId) -> anyhow::Result<EvalReport> {
        Ok(self.http.get_json(self.node, &format!("/evaluation/{id}"), Duration::from_secs(30)).await?)
    }

    /// The report without per-test results (cheap enough to poll).
    pub async fn progress(&self, id: EvalId) -> anyhow::Result<EvalReport> {
        Ok(self
            .http
            .get_json(self.node, &format!("/evaluation/{id}?tests=false"), Duration::from_secs(30))
            .await?)
    }

    /// Evaluation ids: cdtester's (integers) and those owned by reference nodes (strings).
    pub async fn list(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(self.http.get_json(self.node, "/evaluation", Duration::from_secs(30)).await?)
    }

    /// Polls until the evaluation finishes, showing a progress bar (unless `quiet`).
    pub async fn wait(&self, id: EvalId, quiet: bool) -> anyhow::Result<EvalReport> {
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} modules  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        let started = Instant::now();
        loop {
            let r = self.progress(id).await?;
            let s = &r.summary;
            let (done, running, pending) = (s.executed, s.executing, s.pending);
            bar.set_length(done + running + pending);
            bar.set_position(done);
            bar.set_message(format!(
                "executed {done}, running {running}, pending {pending} | {} passed, {} failed",
                s.total_passed, s.total_failed
            ));
            if r.status == EvalStatus::Finished {
                bar.finish_and_clear();
                return self.report(id).await;
            }
            if started.elapsed() > Duration::from_secs(24 * 3600) {
                bail!("evaluation {id} did not finish within a day");
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
}

/// The evaluation id of a node's answer to `POST /evaluation` or `POST /evaluation/{id}/rerun`.
pub fn created_id(answer: &serde_json::Value) -> anyhow::Result<EvalId> {
    EvalId::deserialize(&answer["eval_id"])
        .with_context(|| format!("the node's answer has no valid eval_id: {answer}"))
}

fn eval_id(body: &[u8]) -> anyhow::Result<EvalId> {
    created_id(&serde_json::from_slice(body).context("decoding the node's answer")?)
}

/// Zips local sources (folders and zip files) into one upload.
pub fn local_upload(sources: &[String]) -> anyhow::Result<(Vec<u8>, String)> {
    if let [single] = sources
        && single.ends_with(".zip")
    {
        let bytes = std::fs::read(single).with_context(|| format!("reading {single}"))?;
        let name =
            Path::new(single).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok((bytes, name));
    }
    let mut projects: Vec<(String, PathBuf)> = Vec::new();
    for s in sources {
        let path = Path::new(s);
        if !path.is_dir() {
            bail!("{s} is not a folder, a .zip file or a git URL (zip files must be submitted alone)");
        }
        for (name, dir) in crate::archive::split_projects(path).with_context(|| format!("reading {s}"))? {
            let taken: Vec<String> = projects.iter().map(|(p, _)| p.clone()).collect();
            projects.push((crate::eval::unique_name(&taken, &name), dir));
        }
    }
    Ok((fetch::pack_projects(&projects)?, "projects.zip".into()))
}

/// Prints a report: which evaluation, then the results table every command shows
/// ([`crate::render::table`]).
pub fn print_table(r: &EvalReport) {
    println!("evaluation {}  ({}, {:.1} s, node {})", r.id, r.status.as_str(), r.time_elapsed, r.node);
    print!("{}", crate::render::table(r));
}

/// A single-threaded runtime for a CLI command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")
}

/// `cdtester submit`.
pub fn submit(args: SubmitArgs, default_node: SocketAddr) -> anyhow::Result<()> {
    let client = Client::new(args.follow.node.unwrap_or(default_node));
    let (urls, local): (Vec<String>, Vec<String>) = args.sources.iter().cloned().partition(|s| is_url(s));
    let roster = args.roster.as_deref().map(crate::course_cmd::read_roster).transpose()?;
    runtime()?.block_on(async {
        let mut ids = Vec::new();
        if let Some(roster) = &roster {
            let token = std::env::var(TOKEN_VAR).ok().filter(|t| !t.is_empty());
            ids.push(crate::course_cmd::submit_roster(client.node, roster, token.as_deref()).await?);
        }
        if !local.is_empty() {
            let (zip, name) = local_upload(&local)?;
            ids.push(client.submit_zip(zip, &name).await.context("submitting")?);
        }
        if !urls.is_empty() {
            let token = std::env::var(TOKEN_VAR).ok().filter(|t| !t.is_empty());
            ids.push(client.submit_urls(&urls, token.as_deref()).await.context("submitting")?);
        }
        for id in ids {
            args.follow.submitted(&client, id, "").await?;
        }
        Ok(())
    })
}

/// `cdtester status`.
pub fn status(args: StatusArgs, default_node: SocketAddr) -> anyhow::Result<()> {
    let client = Client::new(args.node.unwrap_or(default_node));
    runtime()?.block_on(async {
        let r = client.report(args.id).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print_table(&r);
        }
        Ok(())
    })
}

/// `cdtester list`.
pub fn list(args: ListArgs, default_node: SocketAddr) -> anyhow::Result<()> {
    let client = Client::new(args.node.unwrap_or(default_node));
    runtime()?.block_on(async {
        for id in client.list().await? {
            println!("{}", id.as_str().map_or_else(|| id.to_string(), String::from));
        }
        Ok(())
    })
}
