//! A project on this node: its archive (downloaded and checked), its extracted tree, this
//! node's runner decision, its preparation, and module discovery.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cdtester_plugins::{ProjectMeta, RunnerChoice};
use cdtester_runner_api::{PreparedProject, ProjectSource};

use super::App;
use crate::engine::{Discovery, Input, NO_TESTS};
use crate::eval::ProjectRecord;
use crate::ids::EvalId;

impl App {
    /// Discovers a project's modules in the background, then tells the engine.
    pub(super) fn spawn_discovery(self: &Arc<Self>, eval: EvalId, project: ProjectRecord) {
        let app = self.clone();
        tokio::spawn(async move {
            let outcome = app.discover(&project).await.map_err(|e| app.redact(&e));
            if let Err(error) = &outcome {
                tracing::warn!(%eval, project = %project.id, "project cannot be evaluated: {error}");
            }
            app.apply(Input::Discovered { eval, project: project.id, outcome });
        });
    }

    /// Discovers a project's modules under this node's runner decision.
    pub(super) async fn discover(self: &Arc<Self>, project: &ProjectRecord) -> Result<Discovery, String> {
        // A rerun runs only the modules it names (taken first: every way out of here is final).
        let only = self.shell().rerun_only.remove(&project.id);
        // Preparing and collecting start pytest processes: at most one per worker slot at once.
        let _permit = self.discoveries.acquire().await.map_err(|e| e.to_string())?;
        let root = self.ensure_project(project, None).await?;
        let (choice, settings) = self.choose_runner(project, &root).await?;
        let prepared = self
            .prepare(&choice.runner, project, &project.content_hash, &root, &settings.requirements)
            .await?;
        let runner = (self.runners)(&choice.runner)?;
        let modules = tokio::task::spawn_blocking(move || runner.discover(&prepared))
            .await
            .map_err(|e| format!("discovery crashed: {e}"))?;
        let modules = modules.map(|all| {
            all.into_iter().filter(|m| only.as_ref().is_none_or(|o| o.contains(m))).collect::<Vec<_>>()
        });
        match modules {
            Ok(modules) => Ok(Discovery {
                modules,
                runner: choice.runner,
                limits: choice.limits,
                policies: settings.policies,
            }),
            Err(cdtester_runner_api::RunnerError::NoTests) => Err(NO_TESTS.into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Fetches a replicated project's archive in the background when this node lacks it, so
    /// that it can serve the project after a takeover.
    pub(super) fn prefetch(self: &Arc<Self>, project: ProjectRecord, from: SocketAddr) {
        if self.store.has_blob(&project.content_hash)
            || !self.shell().fetching.insert(project.content_hash.clone())
        {
            return;
        }
        let app = self.clone();
        tokio::spawn(async move {
            if let Err(e) = app.download_blob(&project, Some(from)).await {
                tracing::debug!(project = %project.id, "prefetching the project archive failed: {e}");
            }
            app.shell().fetching.remove(&project.content_hash);
        });
    }

    /// This node's own decision for a project: configuration rules, then the policy chain
    /// (admission, runner and limits), made once per project on this node. A worker decides itself rather than trusting the runner and
    /// limits a peer's record names: no peer can make this node run code less isolated than its
    /// own configuration says. Refuses the `local` runner for HTTP submissions when the API
    /// listens beyond loopback, unless `runner.local.allow_remote_submissions` is set.
    pub(super) async fn choose_runner(
        self: &Arc<Self>,
        project: &ProjectRecord,
        root: &std::path::Path,
    ) -> Result<(RunnerChoice, cdtester_config::ProjectSettings), String> {
        if let Some(decided) = self.shell().choices.get(&project.id) {
            return Ok(decided.clone());
        }
        let mut settings = self.cfg.project_settings(&project.name, project.url.as_deref());
        if settings.runner_by_name && settings.runner != self.cfg.runner.default && !self.local {
            // Names of submitted projects are the submitter's choice: they never route a
            // project away from the default runner (a URL rule or a policy may). A local app's
            // names are the operator's own folder names.
            tracing::warn!(project = %project.id, rule_runner = %settings.runner, "a rule matching only the submitted name does not choose the runner");
            settings.runner = self.cfg.runner.default.clone();
        }
        let app = self.clone();
        let (name, url, root) = (project.name.clone(), project.url.clone(), root.to_path_buf());
        let policies = settings.policies.clone();
        let configured = RunnerChoice { runner: settings.runner.clone(), limits: settings.limits.clone() };
        let choice = tokio::task::spawn_blocking(move || {
            let meta = ProjectMeta::from_dir(&name, url.as_deref(), &root).map_err(|e| e.to_string())?;
            app.policies.decide(&policies, &meta, configured)
        })
        .await
        .map_err(|e| format!("policy evaluation crashed: {e}"))??;
        if choice.runner == "local"
            // Beyond loopback: where the API listens (`node.http`, bound) or is advertised.
            && !(self.cfg.node.http.ip().is_loopback() && self.http.ip().is_loopback())
            && !self.cfg.runner.local.allow_remote_submissions
        {
            return Err(
                "refused: this node's API listens beyond loopback and the local runner does not isolate \
                 untrusted code; use the docker runner or set runner.local.allow_remote_submissions"
                    .into(),
            );
        }
        self.shell().choices.insert(project.id.clone(), (choice.clone(), settings.clone()));
        Ok((choice, settings))
    }

    /// Makes sure the project's files are extracted in this node's project cache (downloading the
    /// archive from `from`, or from the responsible node, when the blob is missing). Returns the
    /// project root.
    pub(super) async fn ensure_project(
        &self,
        project: &ProjectRecord,
        from: Option<SocketAddr>,
    ) -> Result<PathBuf, String> {
        let hash = project.content_hash.clone();
        if let Some(root) = self.shell().local_roots.get(&hash) {
            return Ok(root.clone());
        }
        if !self.store.has_blob(&hash) {
            self.download_blob(project, from).await?;
        }
        let root = self.projects_dir.join(&hash);
        if root.is_dir() {
            return Ok(root);
        }
        let blob = self.store.blob_path(&hash).map_err(|e| e.to_string())?;
        let dir = self.projects_dir.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&blob).map_err(|e| format!("reading {}: {e}", blob.display()))?;
            let tmp = tempfile::tempdir_in(&dir).map_err(|e| e.to_string())?;
            crate::archive::extract_zip(&bytes, tmp.path()).map_err(|e| e.to_string())?;
            let tmp = tmp.keep();
            if let Err(e) = std::fs::rename(&tmp, &root) {
                let _ = std::fs::remove_dir_all(&tmp);
                if !root.is_dir() {
                    return Err(format!("installing {}: {e}", root.display()));
                }
            }
            Ok(root)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Downloads a project archive and checks its hash.
    pub(super) async fn download_blob(
        &self,
        project: &ProjectRecord,
        from: Option<SocketAddr>,
    ) -> Result<(), String> {
        let mut sources: Vec<SocketAddr> = from.into_iter().collect();
        let (responsible, submitted_to) = {
            let engine = self.engine();
            let rec = engine.project(&project.id).map(|(r, _)| r);
            (rec.map(|r| r.responsible.socket()), rec.map(|r| r.submitted_to.socket()))
        };
        sources.extend(responsible.into_iter().chain(submitted_to));
        if let Some(net) = self.net() {
            sources.extend(net.snapshot().peers.values().filter_map(|a| a.parse::<SocketAddr>().ok()));
        }
        let mut last = format!("no node serves project {}", project.id);
        let mut tried = HashSet::new();
        for udp in sources {
            if udp == self.udp || !tried.insert(udp) {
                continue;
            }
            let Some(http) = self.http_of(udp) else { continue };
            let path = format!("/file/{}", project.id);
            match self.client.send(hyper::Method::GET, http, &path, None, Duration::from_secs(120)).await {
                Ok(resp) => {
                    let got = cdtester_runner_api::sha256_hex(&resp.body);
                    if got != project.content_hash {
                        last =
                            format!("archive from {udp} has sha256 {got}, expected {}", project.content_hash);
                        tracing::warn!("{last}");
                        continue;
                    }
                    self.store.put_blob(&got, &resp.body).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Prepares a project with a runner once per (content, runner) on this node.
    pub(super) async fn prepare(
        &self,
        runner_name: &str,
        project: &ProjectRecord,
        hash: &str,
        root: &std::path::Path,
        requirements: &[String],
    ) -> Result<PreparedProject, String> {
        let runner = (self.runners)(runner_name)?;
        let cell = {
            let mut map = self.prepared_map();
            map.entry((hash.to_string(), runner_name.to_string())).or_default().clone()
        };
        let mut guard = cell.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        let source = ProjectSource {
            id: format!("{hash}-{runner_name}"),
            name: project.name.clone(),
            root: root.to_path_buf(),
            extra_requirements: requirements.to_vec(),
        };
        let prepared = tokio::task::spawn_blocking(move || runner.prepare(&source))
            .await
            .map_err(|e| format!("preparation crashed: {e}"))?
            .map_err(|e| e.to_string())?;
        *guard = Some(prepared.clone());
        Ok(prepared)
    }
}
