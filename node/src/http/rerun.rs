//! `POST /evaluation/{id}/rerun`: a new evaluation of a finished one's projects (the same
//! archives) that runs only some of their test modules.
//!
//! Body (JSON, optional): `{"only": "failed"}` (the default: every module with a failed, errored,
//! timed-out or crashed test) or `{"only": ["<test node id or module path>", ...]}` (the modules
//! that hold them). Selection is by module: a module runs whole. Projects with nothing selected
//! are left out. Answer: `{"status": "submitted", "eval_id", "rerun_of", "modules": {project:
//! [module, ...]}}`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::{App, AppError};
use crate::eval::EvalStatus;
use crate::fetch::FetchedProject;
use crate::ids::EvalId;

/// The request body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerunRequest {
    #[serde(default)]
    pub only: Option<Only>,
}

/// What to run again.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Only {
    /// `"failed"`.
    Keyword(String),
    /// Test node ids (`tests/test_x.py::test_y`) or module paths.
    Tests(Vec<String>),
}

/// The modules of `modules` (path, failures) that `only` selects.
fn select(only: &Option<Only>, modules: &[(String, u64)]) -> Result<BTreeSet<String>, AppError> {
    match only {
        None => Ok(modules.iter().filter(|(_, f)| *f > 0).map(|(m, _)| m.clone()).collect()),
        Some(Only::Keyword(k)) if k == "failed" => select(&None, modules),
        Some(Only::Keyword(k)) => Err(AppError::BadRequest(format!(
            "\"only\" must be \"failed\" or a list of test node ids, not {k:?}"
        ))),
        Some(Only::Tests(ids)) => Ok(modules
            .iter()
            .filter(|(m, _)| ids.iter().any(|id| id.split("::").next() == Some(m.as_str())))
            .map(|(m, _)| m.clone())
            .collect()),
    }
}

/// Submits the rerun of evaluation `id`; returns the answer's JSON.
pub async fn rerun(app: &Arc<App>, id: EvalId, req: RerunRequest) -> Result<Value, AppError> {
    let not_found = || AppError::NotFound("Evaluation not found".into());
    let report = app.report(id, false).ok_or_else(not_found)?;
    if report.status != EvalStatus::Finished {
        return Err(AppError::BadRequest("the evaluation is still running: rerun it once finished".into()));
    }
    let record = app.record(id).ok_or_else(not_found)?;
    let (mut fetched, mut only, mut chosen) = (Vec::new(), Vec::new(), BTreeMap::new());
    for (name, p) in &report.projects {
        let modules: Vec<(String, u64)> =
            p.modules.iter().map(|(m, v)| (m.clone(), v.counts.failures())).collect();
        let selected = select(&req.only, &modules)?;
        let Some(project) = record.project(&p.id).filter(|_| !selected.is_empty()) else { continue };
        let (sha256, archive) = app.project_file(p.id.as_str()).map_err(|_| {
            AppError::Unavailable(format!(
                "the archive of {name} is not on this node; ask the node that ran it"
            ))
        })?;
        fetched.push(FetchedProject {
            name: project.name.clone(),
            url: project.url.clone(),
            archive,
            sha256,
        });
        chosen.insert(name.clone(), selected.iter().cloned().collect::<Vec<_>>());
        only.push(Some(selected));
    }
    if fetched.is_empty() {
        return Err(AppError::BadRequest("nothing to rerun: no module is selected".into()));
    }
    let new_id = app.submit_only(fetched, only, Some(id)).await?;
    tracing::info!(eval = %new_id, rerun_of = %id, "rerun submitted");
    Ok(json!({ "status": "submitted", "eval_id": new_id, "rerun_of": id, "modules": chosen }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_by_failures_or_node_ids() {
        let modules = vec![("t/a.py".to_string(), 0), ("t/b.py".to_string(), 2), ("t/c.py".to_string(), 1)];
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(select(&None, &modules).unwrap(), set(&["t/b.py", "t/c.py"]));
        assert_eq!(
            select(&Some(Only::Keyword("failed".into())), &modules).unwrap(),
            set(&["t/b.py", "t/c.py"])
        );
        assert!(select(&Some(Only::Keyword("all".into())), &modules).is_err());
        let ids = Only::Tests(vec!["t/a.py::test_x[1]".into(), "t/c.py".into(), "t/zz.py::t".into()]);
        assert_eq!(select(&Some(ids), &modules).unwrap(), set(&["t/a.py", "t/c.py"]));
    }
}
