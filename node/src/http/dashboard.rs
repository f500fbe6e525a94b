//! The course staff's routes: the dashboard at `GET /` (one self-contained page, its script and
//! style sheet embedded in the binary: no CDN, no build step), `GET /evaluation/{id}/grades.csv`,
//! `GET /evaluation/{id}/events` (server-sent events), `POST /evaluation/{id}/rerun`,
//! `GET /history/{project}` and `GET /openapi.json`.
//!
//! The page builds every element with `createElement`/`textContent` (project names, test ids and
//! failure messages are chosen by students) and is served with a Content-Security-Policy that
//! allows nothing but this node's own script, style sheet and API.

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::budget::Budgets;
use super::{events, grades, openapi};
use crate::app::{App, AppError};
use crate::http::rerun::RerunRequest;
use crate::ids::EvalId;

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const DASHBOARD_JS: &str = include_str!("../../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../../assets/dashboard.css");

/// The Content-Security-Policy of the dashboard's page and assets.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
struct Staff {
    app: Arc<App>,
    streams: Arc<Semaphore>,
}

/// The routes of this module.
pub fn routes(app: Arc<App>) -> Router {
    let staff = Staff { app, streams: Arc::new(Semaphore::new(events::MAX_STREAMS)) };
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/evaluation/{id}/grades.csv", get(grades_csv))
        .route("/evaluation/{id}/events", get(event_stream))
        .route("/evaluation/{id}/rerun", post(rerun))
        .route("/history/{project}", get(history))
        .route("/openapi.json", get(openapi_json))
        .with_state(staff)
}

/// A page or asset with the dashboard's security headers.
fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "dashboard.js" => page("text/javascript; charset=utf-8", DASHBOARD_JS),
        "dashboard.css" => page("text/css; charset=utf-8", DASHBOARD_CSS),
        _ => AppError::NotFound("no such asset".into()).into_response(),
    }
}

async fn grades_csv(State(staff): State<Staff>, Path(id): Path<String>) -> Response {
    let report = super::parse_id(&id)
        .and_then(|id| staff.app.report(id, false).ok_or(AppError::NotFound("Evaluation not found".into())));
    match report {
        Ok(r) => {
            let disposition = format!("attachment; filename=\"grades-{}.csv\"", r.id);
            let mut resp =
                ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], grades::grades_csv(&r)).into_response();
            if let Ok(v) = HeaderValue::from_str(&disposition) {
                resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

async fn event_stream(
    State(staff): State<Staff>,
    Extension(budgets): Extension<Arc<Budgets>>,
    Path(id): Path<String>,
    req: Parts,
) -> Response {
    let id = match super::parse_id(&id) {
        Ok(id) if staff.app.record(id).is_some() => id,
        Ok(_) | Err(_) => return AppError::NotFound("Evaluation not found".into()).into_response(),
    };
    let mine = match budgets.stream(super::client_of(&req)) {
        Ok(slot) => slot,
        Err(e) => return e.into_response(),
    };
    let Ok(slot) = staff.streams.clone().try_acquire_owned() else {
        return AppError::Unavailable(format!(
            "{} event streams are open on this node; retry later",
            events::MAX_STREAMS
        ))
        .into_response();
    };
    events::follow(staff.app, id, (slot, mine)).into_response()
}

/// Largest body of `POST /evaluation/{id}/rerun`.
const MAX_RERUN_BODY: usize = 256 * 1024;

/// `POST /evaluation/{id}/rerun`. The body must be declared JSON (even when empty): a browser
/// sends that cross-site only after a CORS preflight, which this node never grants, so another
/// site cannot make a staff member's browser start reruns.
async fn rerun(
    State(staff): State<Staff>,
    Extension(budgets): Extension<Arc<Budgets>>,
    Path(id): Path<String>,
    req: Parts,
    body: axum::body::Bytes,
) -> Response {
    let headers = &req.headers;
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, axum::Json(serde_json::json!({
            "error": "send Content-Type: application/json with {\"only\": \"failed\"} or {\"only\": [\"<test node id>\", ...]}"
        })))
        .into_response();
    }
    let answer = async {
        let id = super::parse_id(&id)?;
        if body.len() > MAX_RERUN_BODY {
            return Err(AppError::TooLarge(format!("the body is over {MAX_RERUN_BODY} bytes")));
        }
        let rerun: RerunRequest = if body.iter().all(u8::is_ascii_whitespace) {
            RerunRequest::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| {
                AppError::BadRequest(format!(
                    "invalid JSON body ({e}); expected {{\"only\": \"failed\"}} or {{\"only\": [\"<test node id>\", ...]}}"
                ))
            })?
        };
        let admission = budgets.admit(super::client_of(&req), |id| super::unfinished(&staff.app, id))?;
        let answer = super::rerun::rerun(&staff.app, id, rerun).await?;
        if let Ok(new_id) = EvalId::deserialize(&answer["eval_id"]) {
            admission.created(new_id);
        }
        Ok(answer)
    };
    match answer.await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /history/{project}`: `{"project", "keep", "tests": {node id: [run, ...]}}`, each test's
/// last runs (oldest first) across evaluations of projects of that name.
async fn history(State(staff): State<Staff>, Path(project): Path<String>) -> Response {
    if !crate::eval::valid_project_name(&project) {
        return AppError::BadRequest("invalid project name".into()).into_response();
    }
    let app = staff.app.clone();
    let name = project.clone();
    let runs = tokio::task::spawn_blocking(move || app.history(&name)).await;
    match runs {
        Ok(Ok(tests)) => axum::Json(serde_json::json!({
            "project": project,
            "keep": crate::store::HISTORY_KEEP,
            "tests": tests.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => AppError::Internal(e.to_string()).into_response(),
    }
}

async fn openapi_json() -> Response {
    (StatusCode::OK, axum::Json(openapi::document())).into_response()
}
