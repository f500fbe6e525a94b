//! Handing this node's tasks to reference workers (nodes of the earlier Python
//! implementation), in the reference's terms (`research/reference.md` §2.3, §3.3, §4.3):
//!
//! - A reference worker runs `<project_id>/tests/<file>` of a project it fetched on
//!   PROJECT_ANNOUNCE (`GET /file/<project_id>`, a zip whose top folder is the project id). So it
//!   gets only tasks of whole modules directly under `tests/`, named by their file name, and
//!   every such project is announced to it before the first TASK_SEND.
//! - Its TASK_CONFIRM and `POST /task` name the task `<project_id>::<file>`; they are mapped
//!   back to this node's task. Its result carries counts only: the module's report holds one
//!   entry per counted test, marked as coming from a reference worker (per-test names and
//!   messages are lost).
//! - Projects of evaluations this node schedules are announced to every reference peer, as a
//!   reference owner does, so that a reference node taking over after this node's failure has
//!   them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use cdtester_runner_api::{ModuleReport, Outcome, TestResult};

use super::{App, now};
use crate::engine::{Action, Input, TaskPost};
use crate::eval::ProjectState;
use crate::ids::TaskId;
use crate::interop;
use crate::wire::{Message, ProjectAnnounceData, ProjectSourceKind, TaskConfirmData};

/// Most repacked archives kept.
const MAX_REPACKED: usize = 8;
/// Most tests a reference worker's counts stand for in a module's report.
const MAX_COUNTED: u64 = 10_000;

/// The reference's name for a module of this node, when a reference worker can run it: a file
/// directly under `tests/`.
fn reference_module(module: &str) -> Option<&str> {
    let file = module.strip_prefix("tests/")?;
    interop::valid_module(file).then_some(file)
}

/// The reference's name for a task's module, when a reference worker can run the task: the
/// module whole (not a chunk) and a [`reference_module`].
fn reference_task(task: &TaskId) -> Option<&str> {
    if task.chunk().is_some() {
        return None;
    }
    reference_module(task.module())
}

impl App {
    /// TASK_REQUEST of a reference worker: a waiting module of a reference project this node
    /// took over goes first (see [`super::reference_owner`]); else the engine picks a task; one
    /// a reference worker can run is sent in its terms (after announcing its project), another
    /// is not sent (the engine hands it out again when its confirmation does not come).
    pub(super) fn hand_to_reference(self: &Arc<Self>, worker: SocketAddr, request: Message) {
        if self.ref_state().worker_busy(worker) || self.hand_owned(worker) || !self.has_reference_work() {
            return;
        }
        let actions = self.engine().handle(now(), Input::Message { from: worker, msg: request });
        let mut rest = Vec::new();
        for action in actions {
            match action {
                Action::Send { to, msg: Message::TaskSend(mut data) } if to == worker => {
                    let ours = TaskId::from_parts(&data.info.project_id, &data.info.module).ok();
                    let Some((ours, file)) =
                        ours.and_then(|t| Some((t.to_string(), reference_task(&t)?.to_string())))
                    else {
                        tracing::debug!(task = %data.info.module, %worker, "task not in the reference's layout: not sent");
                        continue;
                    };
                    self.announce_to(worker, &data.info.project_id);
                    self.ref_state().hand((worker, interop::task_id(&data.info.project_id, &file)), ours);
                    data.info.module = file;
                    if let Some(net) = self.net() {
                        net.send(worker, Message::TaskSend(data));
                    }
                }
                other => rest.push(other),
            }
        }
        self.execute(rest);
    }

    /// Whether an evaluation this node schedules has a task without result, not running, that a
    /// reference worker can run (so that asking the engine for one is likely to give one).
    fn has_reference_work(&self) -> bool {
        let me = self.addr();
        let engine = self.engine();
        engine.records().filter(|r| r.responsible == me && r.end_time.is_none()).any(|r| {
            r.all_tasks().any(|t| {
                !r.results.contains_key(&t.task_id)
                    && !r.running.contains_key(&t.task_id)
                    && reference_task(&t.task_id).is_some()
            })
        })
    }

    /// TASK_CONFIRM of a reference worker, in this node's terms.
    pub(super) fn reference_confirm(self: &Arc<Self>, worker: SocketAddr, task: &str) {
        if self.confirm_owned(worker, task) {
            return;
        }
        let ours = self.ref_state().confirmed(&(worker, task.to_string()));
        match ours {
            Some(task_id) => {
                self.apply(Input::Message {
                    from: worker,
                    msg: Message::TaskConfirm(TaskConfirmData { task_id }),
                });
            }
            None => tracing::debug!(%task, %worker, "TASK_CONFIRM for no task handed to a reference worker"),
        }
    }

    /// A reference worker's `POST /task` (counts only, no evaluation id) in this node's terms;
    /// other posts unchanged.
    pub(super) fn translate_reference_post(&self, mut post: TaskPost, caller: SocketAddr) -> TaskPost {
        if post.eval_id.is_some() || post.report.is_some() || post.error.is_some() {
            return post;
        }
        let key = (caller, post.result.task_id.clone());
        let Some(ours) = self.ref_state().finished(&key) else { return post };
        let Ok(ours) = ours.parse::<TaskId>() else { return post };
        post.eval_id = self.engine().project(ours.project()).map(|(r, _)| r.id);
        let module = ours.module().to_string();
        let outcomes = std::iter::repeat_n(Outcome::Passed, post.result.passed.min(MAX_COUNTED) as usize)
            .chain(std::iter::repeat_n(Outcome::Failed, post.result.failed.min(MAX_COUNTED) as usize));
        let tests = outcomes.enumerate().map(|(i, outcome)| {
            TestResult::new(
                format!("{module}::<reference worker result {}>", i + 1),
                outcome,
                0.0,
                Some("per-test results are not available from a reference worker".into()),
            )
        });
        post.report = Some(ModuleReport {
            module: module.clone(),
            tests: tests.collect(),
            duration: post.result.time.max(0.0),
            note: Some(format!("run by a reference worker ({caller}): counts only")),
            output: None,
            output_truncated: false,
        });
        post.result.module = module;
        post.result.task_id = ours.to_string();
        post
    }

    /// Sends PROJECT_ANNOUNCE of one of this node's projects to a reference peer, once.
    fn announce_to(&self, peer: SocketAddr, project_id: &str) {
        if !self.ref_state().announce((peer, project_id.to_string())) {
            return;
        }
        let found = project_id
            .parse()
            .ok()
            .and_then(|pid| self.engine().project(&pid).map(|(r, p)| (r.id, p.name.clone())));
        let Some((eval_id, name)) = found else { return };
        let data = ProjectAnnounceData {
            project_id: project_id.to_string(),
            api_port: self.http.port().to_string(),
            project_name: name,
            eval_id: eval_id.to_string(),
            url: None,
            token: None,
            kind: ProjectSourceKind::Zip,
        };
        if let Some(net) = self.net() {
            net.send(peer, Message::ProjectAnnounce(data));
        }
    }

    /// Announces the ready projects of unfinished evaluations this node is responsible for to
    /// every reference peer that has not had them.
    pub(super) fn announce_to_reference(&self) {
        let Some(net) = self.net() else { return };
        let snap = net.snapshot();
        let peers: Vec<SocketAddr> = snap
            .peers
            .values()
            .filter(|a| !snap.http.contains_key(*a))
            .filter_map(|a| a.parse().ok())
            .collect();
        if peers.is_empty() {
            return;
        }
        let me = self.addr();
        let projects: HashSet<String> = self
            .engine()
            .records()
            .filter(|r| r.responsible == me && r.end_time.is_none())
            .flat_map(|r| r.projects.iter())
            .filter(|p| matches!(p.state, ProjectState::Ready { .. }))
            .map(|p| p.id.to_string())
            .collect();
        for peer in peers {
            for p in &projects {
                self.announce_to(peer, p);
            }
        }
    }

    /// Names modules directly under `tests/` in a CACHE_UPDATE as the reference does (its file
    /// name), so that a reference node taking over this node's evaluations runs them.
    pub(super) fn reference_names(content: &mut crate::wire::CacheContent) {
        for p in content.projects.values_mut() {
            let modules = std::mem::take(&mut p.modules);
            for (name, m) in modules {
                let short = reference_module(&name).filter(|s| !p.modules.contains_key(*s)).map(String::from);
                p.modules.insert(short.unwrap_or(name), m);
            }
        }
    }

    /// A project's archive in the reference's `/file` layout: every entry under
    /// `<project_id>/` (repacked once per project).
    pub fn reference_file(&self, project_id: &str) -> Result<Arc<Vec<u8>>, super::AppError> {
        if let Some(bytes) = self.ref_state().repacked.get(project_id) {
            return Ok(bytes.clone());
        }
        let bytes = match self.project_file(project_id) {
            Ok((_, bytes)) => bytes,
            // A reference project this node fetched (and may own now).
            Err(e) => {
                let hash = self.ref_state().fetched(project_id).map(|p| p.content_hash);
                hash.and_then(|h| self.store.read_blob(&h).ok()).ok_or(e)?
            }
        };
        let internal = |e: String| {
            tracing::warn!("repacking project {project_id} for a reference node: {e}");
            super::AppError::Internal("repacking the project failed".into())
        };
        let dir = tempfile::tempdir_in(&self.work_dir).map_err(|e| internal(e.to_string()))?;
        crate::archive::extract_zip(&bytes, dir.path()).map_err(|e| internal(e.to_string()))?;
        let packed = crate::fetch::pack_projects(&[(project_id.to_string(), dir.path().to_path_buf())])
            .map_err(|e| internal(e.to_string()))?;
        let packed = Arc::new(packed);
        let mut st = self.ref_state();
        if st.repacked.len() >= MAX_REPACKED {
            st.repacked.clear();
        }
        st.repacked.insert(project_id.to_string(), packed.clone());
        Ok(packed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_modules_directly_under_tests_go_to_reference_workers() {
        assert_eq!(reference_module("tests/test_a.py"), Some("test_a.py"));
        for no in
            ["tests/sub/test_a.py", "test_a.py", "tests/test_a.py#0/2", "checks/test_a.py", "tests/.x.py"]
        {
            assert_eq!(reference_module(no), None, "{no}");
        }
    }
}
