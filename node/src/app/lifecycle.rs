//! What evaluations leave behind is collected: a prepared project (a warm pytest server, a
//! container, a copied tree) is released once no unfinished evaluation uses its content for
//! `node.release_after_s`; extracted project trees go with it; stored archives of finished
//! evaluations are deleted, oldest first, while they exceed `node.cache_budget_mb`. So memory,
//! processes and disk return to idle after evaluations end.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::App;
use crate::ids::ProjectId;

/// Period of the collector.
const PERIOD: Duration = Duration::from_secs(2);

/// Prepared projects by (content hash, runner name): when each became idle.
type IdleSince = HashMap<(String, String), Instant>;

pub async fn run(app: Arc<App>) {
    let mut idle = IdleSince::new();
    loop {
        tokio::time::sleep(PERIOD).await;
        collect(&app, &mut idle).await;
    }
}

/// Content hashes of every project of an unfinished evaluation; forgets the runner decisions of
/// the other projects.
fn active_content(app: &App) -> HashSet<String> {
    let (ids, hashes): (HashSet<ProjectId>, HashSet<String>) =
        app.engine().active_projects().map(|p| (p.id.clone(), p.content_hash.clone())).unzip();
    app.shell().choices.retain(|id, _| ids.contains(id));
    hashes
}

async fn collect(app: &Arc<App>, idle: &mut IdleSince) {
    let active = active_content(app);
    let grace = Duration::from_secs(app.cfg.node.release_after_s);
    let now = Instant::now();
    let keys: Vec<(String, String)> = app.prepared_map().keys().cloned().collect();
    idle.retain(|k, _| keys.contains(k));
    let mut due = Vec::new();
    for k in keys {
        if active.contains(&k.0) {
            idle.remove(&k);
        } else if now.duration_since(*idle.entry(k.clone()).or_insert(now)) >= grace {
            due.push(k);
        }
    }
    let released = !due.is_empty();
    for key in due {
        idle.remove(&key);
        release(app, key).await;
    }
    if released {
        return_freed_memory();
    }
    let prepared: HashSet<String> = app.prepared_map().keys().map(|(h, _)| h.clone()).collect();
    let app2 = app.clone();
    let swept = tokio::task::spawn_blocking(move || sweep_disk(&app2, &active, &prepared, grace)).await;
    if let Err(e) = swept {
        tracing::warn!("collecting project files crashed: {e}");
    }
}

/// Hands memory freed by released projects back to the system (glibc keeps it otherwise).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Releases every prepared project now (stopping the warm interpreters they hold).
pub(super) async fn release_all(app: &Arc<App>) {
    let keys: Vec<(String, String)> = app.prepared_map().keys().cloned().collect();
    for key in keys {
        release(app, key).await;
    }
    return_freed_memory();
}

/// Releases one prepared project with its runner.
async fn release(app: &Arc<App>, key: (String, String)) {
    let Some(cell) = app.prepared_map().remove(&key) else { return };
    let Some(prepared) = cell.lock().await.take() else { return };
    let runner = match (app.runners)(&key.1) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(runner = %key.1, "cannot release a prepared project: {e}");
            return;
        }
    };
    tracing::debug!(content = %key.0, runner = %key.1, "releasing an idle prepared project");
    if let Err(e) = tokio::task::spawn_blocking(move || runner.release(&prepared)).await {
        tracing::warn!("releasing a prepared project crashed: {e}");
    }
}

/// Removes extracted trees no active or prepared project uses (older than `grace`) and keeps
/// the archives of inactive projects under the byte budget.
fn sweep_disk(app: &App, active: &HashSet<String>, prepared: &HashSet<String>, grace: Duration) {
    if let Ok(dir) = std::fs::read_dir(&app.projects_dir) {
        for e in dir.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() >= grace);
            let unused =
                crate::eval::is_sha256_hex(&name) && !active.contains(&name) && !prepared.contains(&name);
            if unused
                && old
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                tracing::warn!(content = %name, "removing an idle project tree: {err}");
            }
        }
    }
    let budget = app.cfg.node.cache_budget_mb.saturating_mul(1024 * 1024);
    let mut blobs = app.store.blobs();
    let mut total: u64 = blobs.iter().map(|(_, len, _)| len).sum();
    blobs.sort_by_key(|(_, _, modified)| *modified);
    for (hash, len, _) in blobs {
        if total <= budget {
            break;
        }
        if active.contains(&hash) || prepared.contains(&hash) {
            continue;
        }
        match app.store.remove_blob(&hash) {
            Ok(()) => total = total.saturating_sub(len),
            Err(e) => tracing::warn!(content = %hash, "removing an archive: {e}"),
        }
    }
}
