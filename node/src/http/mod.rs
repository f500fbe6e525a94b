//! The HTTP API every node serves (axum on hyper).
//!
//! Public (SPEC.md §3): `POST /evaluation`, `GET /evaluation`, `GET /evaluation/{id}`,
//! `GET /stats`, `GET /network`. Internal, between members: `GET /file/{project_id}` (a project's
//! archive, header `x-content-sha256`), `POST /task` (a module's result, accepted by the node
//! responsible for the evaluation from the worker it handed the task to), `POST /internal/replicate`, `POST /internal/propose`, `POST /internal/results` (results delivered together), `POST /internal/sync` and
//! `GET /internal/evaluation/{id}` (replication). With a cluster secret every internal route
//! requires a fresh MAC from a live member (see [`auth`]); without one (`node.insecure`) the caller's
//! claimed address must match the connection's source.
//!
//! Every error is a JSON object `{"error": "<what was wrong and what to send instead>"}` with a
//! 4xx status for bad input (never a 500 for anything a client sends).
//!
//! The server ([`serve`]) speaks HTTP/1.1 with a header-read timeout (also the keep-alive idle
//! limit) and a connection cap; uploads stream to disk under a byte cap with a stall timeout
//! (see the `intake` configuration section).

pub mod budget;
pub mod dashboard;
pub mod events;
pub mod grades;
pub mod metrics;
pub mod openapi;
pub mod rerun;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::{App, AppError, TaskPost};
use crate::ids::EvalId;
use crate::peer_http::auth;

/// Largest request body accepted by the internal routes (`POST /evaluation` has its own caps:
/// `intake.max_upload_bytes` for uploads, [`MAX_SUBMIT_JSON`] for JSON).
pub const MAX_BODY: usize = 256 * 1024 * 1024;

/// Largest JSON body of `POST /evaluation` (a token and at most `intake.max_urls` URLs).
pub const MAX_SUBMIT_JSON: usize = 64 * 1024;

type AppState = Arc<App>;

/// The router of a node's API (with the course staff's routes of [`dashboard`] and the
/// request counting and `GET /metrics` of [`metrics`]).
pub fn router(app: Arc<App>) -> Router {
    let budgets =
        budget::Budgets::new(app.intake().max_pending_per_client, app.intake().max_streams_per_client);
    let api = Router::new()
        .route("/evaluation", post(submit).layer(DefaultBodyLimit::disable()).get(list))
        .route("/evaluation/{id}", get(evaluation))
        .route("/stats", get(stats))
        .route("/network", get(network))
        .route("/file/{project_id}", get(file))
        .route("/task", post(task))
        .route("/internal/replicate", post(replicate))
        .route("/internal/propose", post(propose))
        .route("/internal/results", post(results))
        .route("/internal/sync", post(sync))
        .route("/internal/evaluation/{id}", get(internal_evaluation))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app.clone());
    metrics::instrument(api.merge(dashboard::routes(app.clone())).layer(Extension(budgets)), app)
}

/// The client of a request ([`budget::Client`]) from the connection's source address.
pub fn client_of(req: &axum::http::request::Parts) -> budget::Client {
    let peer = req.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    // `serve` always sets it; a request without one (none reach this) shares one budget.
    budget::Client::of(peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))))
}

/// Whether evaluation `id` is still unfinished on this node.
pub fn unfinished(app: &App, id: EvalId) -> bool {
    app.record(id).is_some_and(|r| !r.is_complete())
}

/// Serves the API on `listener` until `shutdown` resolves (then waits up to
/// [`SHUTDOWN_GRACE`] for requests in progress).
///
/// HTTP/1.1 only, with `intake.header_timeout_s` to send a request's headers (it also bounds a
/// keep-alive connection's idleness) and at most `intake.max_connections` open connections. At
/// the cap the oldest connection with no request in progress (a half-sent or idle one) is
/// closed to make room; when every connection is serving a request the new one is closed. So
/// half-open connections can neither exhaust file descriptors nor lock clients out.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cap = app.intake().max_connections;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(app.intake().header_timeout_s));
    let service = hyper_util::service::TowerToHyperService::new(router(app));
    let table = Arc::new(Connections::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors or a connection reset before it was accepted: let
                    // connections close, then go on.
                    tracing::warn!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(conn) = Connections::admit(&table, cap) else {
            tracing::debug!("connection cap reached and every connection busy: closing a new one");
            continue;
        };
        let (service, busy) = (service.clone(), conn.busy_handle());
        let per_request =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                // Internal routes compare a caller's claimed address with the connection's source.
                req.extensions_mut().insert(ConnectInfo(peer));
                let held = busy.hold();
                let answer = hyper::service::Service::call(&service, req);
                async move {
                    let response = answer.await?;
                    Ok::<_, std::convert::Infallible>(
                        response.map(|body| Body::new(HeldBody { body, _held: held })),
                    )
                }
            });
        let serving =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), per_request));
        tokio::spawn(async move {
            tokio::select! {
                served = serving => {
                    if let Err(e) = served {
                        tracing::debug!("HTTP connection ended: {e}");
                    }
                }
                () = conn.evicted() => tracing::debug!("HTTP connection closed to make room (connection cap)"),
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP requests still running at shutdown were cut");
    }
    Ok(())
}

/// How long [`serve`] waits for requests in progress at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The open connections of [`serve`], by accept order, with their requests in progress.
#[derive(Default)]
struct Connections {
    table: Mutex<ConnTable>,
}

#[derive(Default)]
struct ConnTable {
    next: u64,
    open: BTreeMap<u64, OpenConn>,
}

struct OpenConn {
    busy: Arc<std::sync::atomic::AtomicUsize>,
    close: Arc<tokio::sync::Notify>,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection, closing the oldest idle one at the cap; `None` when the cap
    /// is reached and every connection is serving a request.
    fn admit(this: &Arc<Connections>, cap: usize) -> Option<ConnGuard> {
        use std::sync::atomic::Ordering;
        let mut t = this.lock();
        if t.open.len() >= cap {
            let idle = t.open.iter().find(|(_, c)| c.busy.load(Ordering::SeqCst) == 0).map(|(id, _)| *id)?;
            if let Some(old) = t.open.remove(&idle) {
                old.close.notify_one();
            }
        }
        let id = t.next;
        t.next += 1;
        let conn = OpenConn { busy: Arc::default(), close: Arc::default() };
        let guard = ConnGuard { id, table: this.clone(), busy: conn.busy.clone(), close: conn.close.clone() };
        t.open.insert(id, conn);
        Some(guard)
    }
}

/// One admitted connection; unregisters it when dropped.
struct ConnGuard {
    id: u64,
    table: Arc<Connections>,
    busy: Arc<std::sync::atomic::AtomicUsize>,
    close: Arc<tokio::sync::Notify>,
}

impl ConnGuard {
    /// Resolves when the connection was chosen to make room.
    async fn evicted(&self) {
        self.close.notified().await
    }

    fn busy_handle(&self) -> BusyHandle {
        BusyHandle(self.busy.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.lock().open.remove(&self.id);
    }
}

/// Counts a connection's requests in progress.
#[derive(Clone)]
struct BusyHandle(Arc<std::sync::atomic::AtomicUsize>);

impl BusyHandle {
    fn hold(&self) -> Busy {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(self.0.clone())
    }
}

/// One request in progress (until its response body is sent).
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A response body that keeps its connection marked busy until it is sent.
struct HeldBody {
    body: Body,
    _held: Busy,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Binds the API address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such route; see GET /openapi.json for the API")
}

/// `POST /evaluation` JSON body (`token`/`urls` accepted as aliases).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitJson {
    #[serde(default, alias = "token")]
    auth_token: Option<String>,
    #[serde(default, alias = "urls")]
    projects: Option<Vec<SubmitProject>>,
}

/// A project of a JSON submission: a git URL, or `{"name", "url"}` (a roster row).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SubmitProject {
    Url(String),
    Named(crate::course_cmd::NamedProject),
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_ascii_lowercase())
}

fn mime_essence(ct: &str) -> &str {
    ct.split(';').next().unwrap_or("").trim()
}

const SUBMIT_HELP: &str = "send multipart/form-data with a zip in field \"file\", or application/json {\"auth_token\": \"...\", \"projects\": [\"<git url>\", ...]}";

async fn submit(
    State(app): State<AppState>,
    Extension(budgets): Extension<Arc<budget::Budgets>>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let admission = match budgets.admit(client_of(&parts), |id| unfinished(&app, id)) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let req = Request::from_parts(parts, body);
    let Some(ct) = content_type(req.headers()) else {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("missing Content-Type: {SUBMIT_HELP}"));
    };
    let result = match mime_essence(&ct) {
        "multipart/form-data" => submit_multipart(&app, req).await,
        "application/json" => submit_json(&app, req).await,
        other => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Type {other:?}: {SUBMIT_HELP}"),
            );
        }
    };
    match result {
        Ok(id) => {
            admission.created(id);
            axum::Json(json!({ "status": "submitted", "eval_id": id })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// 413: a body over `limit` bytes.
fn too_large(limit: u64) -> AppError {
    AppError::TooLarge(format!("the body is larger than this node accepts here ({limit} bytes)"))
}

/// Refuses a body whose declared length is over `limit` before reading any of it.
fn check_length(headers: &HeaderMap, limit: u64) -> Result<(), AppError> {
    let declared =
        header_str(headers, header::CONTENT_LENGTH.as_str()).and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(too_large(limit)),
        _ => Ok(()),
    }
}

/// The multipart error as an [`AppError`] (413 past the body cap).
fn multipart_error(what: &str, e: axum::extract::multipart::MultipartError, limit: u64) -> AppError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        AppError::BadRequest(format!("{what}: {}", e.body_text()))
    }
}

/// Streams the upload in field `file` to a temporary file (never held whole in memory) under
/// `intake.max_upload_bytes`, with `intake.body_idle_timeout_s` for each piece, holding an
/// upload slot (503 when none is free) until it is extracted.
async fn submit_multipart(app: &Arc<App>, req: Request) -> Result<EvalId, AppError> {
    let limit = app.intake().max_upload_bytes;
    let stall = Duration::from_secs(app.intake().body_idle_timeout_s);
    check_length(req.headers(), limit)?;
    let mut upload = app.new_upload()?;
    let stalled = || {
        AppError::Timeout(format!(
            "the upload stalled for {} s (intake.body_idle_timeout_s)",
            stall.as_secs()
        ))
    };
    let body_limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let req = req.map(|body| Body::new(http_body_util::Limited::new(body, body_limit)));
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| AppError::BadRequest(format!("invalid multipart body: {}", e.body_text())))?;
    loop {
        let field = tokio::time::timeout(stall, form.next_field())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| multipart_error("invalid multipart body", e, limit))?;
        let Some(mut field) = field else {
            return Err(AppError::BadRequest(
                "no \"file\" field in the form: attach the zip as field \"file\"".into(),
            ));
        };
        if field.name() != Some("file") {
            continue;
        }
        while let Some(chunk) = tokio::time::timeout(stall, field.chunk())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| multipart_error("reading field \"file\"", e, limit))?
        {
            if upload.len() + chunk.len() as u64 > limit {
                return Err(too_large(limit));
            }
            upload.write(&chunk).await.map_err(crate::app::intake_error)?;
        }
        if upload.is_empty() {
            return Err(AppError::BadRequest("field \"file\" is empty".into()));
        }
        upload.finish().await.map_err(crate::app::intake_error)?;
        return app.submit_zip(upload).await;
    }
}

async fn submit_json(app: &Arc<App>, req: Request) -> Result<EvalId, AppError> {
    let stall = Duration::from_secs(app.intake().body_idle_timeout_s);
    check_length(req.headers(), MAX_SUBMIT_JSON as u64)?;
    let read = axum::body::to_bytes(req.into_body(), MAX_SUBMIT_JSON);
    let body = tokio::time::timeout(stall, read)
        .await
        .map_err(|_| AppError::Timeout(format!("the body was not received within {} s", stall.as_secs())))?
        .map_err(|e| {
            if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
                too_large(MAX_SUBMIT_JSON as u64)
            } else {
                AppError::BadRequest(format!("reading the body: {e}"))
            }
        })?;
    let parsed: SubmitJson = serde_json::from_slice(&body).map_err(|e| {
        AppError::BadRequest(format!("invalid JSON body ({e}); expected {{\"auth_token\": \"...\", \"projects\": [\"<git url>\", ...]}}"))
    })?;
    let (urls, names): (Vec<String>, Vec<Option<String>>) = parsed
        .projects
        .unwrap_or_default()
        .into_iter()
        .map(|p| match p {
            SubmitProject::Url(u) => (u.trim().to_string(), None),
            SubmitProject::Named(p) => (p.url.trim().to_string(), Some(p.name.trim().to_string())),
        })
        .unzip();
    if urls.is_empty() || urls.iter().any(|u| u.is_empty()) {
        return Err(AppError::BadRequest(
            "\"projects\" (alias \"urls\") must be a non-empty list of git URLs or {\"name\", \"url\"} objects".into(),
        ));
    }
    if names.iter().flatten().any(|n| !crate::eval::valid_project_name(n)) {
        return Err(AppError::BadRequest(
            "a project \"name\" must be 1-255 bytes, not . or .., without / \\ or control characters".into(),
        ));
    }
    let token = parsed.auth_token.filter(|t| !t.is_empty());
    app.submit_urls(token, urls, names).await
}

async fn list(State(app): State<AppState>) -> Response {
    // cdtester's ids are integers, those of evaluations owned by reference nodes strings.
    let mut ids: Vec<serde_json::Value> = app.list().into_iter().map(|id| id.get().into()).collect();
    ids.extend(app.reference_ids().into_iter().map(serde_json::Value::from));
    axum::Json(ids).into_response()
}

/// An evaluation id from a path; anything else is "not found".
pub(crate) fn parse_id(id: &str) -> Result<EvalId, AppError> {
    id.parse::<EvalId>().map_err(|_| AppError::NotFound("Evaluation not found".into()))
}

/// `GET /evaluation/{id}?tests=false` leaves the per-test results out (for progress polling).
#[derive(Debug, Deserialize)]
struct ReportQuery {
    #[serde(default)]
    tests: Option<bool>,
}

async fn evaluation(
    State(app): State<AppState>,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<ReportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let with_tests = match query {
        Ok(q) => q.tests.unwrap_or(true),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid query: {}", e.body_text())),
    };
    let report = parse_id(&id)
        .and_then(|id| app.report(id, with_tests).ok_or(AppError::NotFound("Evaluation not found".into())));
    if report.is_err()
        && let Some(r) = app.reference_report(&id)
    {
        return axum::Json(r).into_response();
    }
    match report {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn stats(State(app): State<AppState>) -> Response {
    axum::Json(app.stats()).into_response()
}

async fn network(State(app): State<AppState>) -> Response {
    axum::Json(app.network()).into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// An IPv4-mapped IPv6 address as its IPv4 address (a dual-stack listener reports those).
fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a signed call's `Host` names this node's HTTP address (any IP when it listens on all
/// of them): a call captured on its way to one member cannot be replayed to another.
fn addressed_to(me: SocketAddr, host: &str) -> bool {
    host.parse::<SocketAddr>().is_ok_and(|h| {
        h.port() == me.port() && (me.ip().is_unspecified() || canonical_ip(h.ip()) == canonical_ip(me.ip()))
    })
}

/// An internal call as the member check sees it: the connection's source, method, path, headers
/// and body (read whole, under [`MAX_BODY`]).
struct InternalCall {
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for InternalCall {
    type Rejection = Response;

    async fn from_request(req: Request, _: &S) -> Result<Self, Response> {
        let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() else {
            return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the connection's source is unknown"));
        };
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        Ok(InternalCall { peer, method: parts.method, uri: parts.uri, headers: parts.headers, body })
    }
}

impl InternalCall {
    /// Authenticates the call and returns the caller's UDP address (see [`auth`]): with a
    /// secret, a valid fresh MAC from a live member; without one, a caller whose claimed address
    /// (`x-cdtester-node`, or `claimed` for reference nodes that send none) has the connection's
    /// source IP.
    fn member(&self, app: &App, claimed: Option<String>) -> Result<SocketAddr, AppError> {
        let header = |name| header_str(&self.headers, name);
        let caller = header(auth::NODE_HEADER).map(str::to_string).or(claimed).unwrap_or_default();
        let path = self.uri.path_and_query().map_or(self.uri.path(), |p| p.as_str());
        let host = header(header::HOST.as_str()).unwrap_or_default();
        let call =
            auth::CallParts { method: self.method.as_str(), host, path, caller: &caller, body: &self.body };
        app.verifier()
            .verify(&call, header(auth::TIME_HEADER), header(auth::NONCE_HEADER), header(auth::MAC_HEADER))
            .map_err(|e| AppError::Forbidden(e.to_string()))?;
        let addr: SocketAddr = caller.parse().map_err(|_| {
            AppError::Forbidden(format!("missing or invalid caller address in {}", auth::NODE_HEADER))
        })?;
        if app.verifier().secret().is_set() {
            if !addressed_to(app.http_addr(), host) {
                return Err(AppError::Forbidden(format!("call signed for another node ({host})")));
            }
            if !app.is_member(addr) {
                return Err(AppError::Forbidden("caller is not a member of this network".into()));
            }
        } else if canonical_ip(addr.ip()) != canonical_ip(self.peer.ip()) {
            return Err(AppError::Forbidden("caller address does not match the connection's source".into()));
        }
        Ok(addr)
    }

    /// The JSON body.
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, AppError> {
        let ct = content_type(&self.headers);
        if ct.as_deref().map(mime_essence) != Some("application/json") {
            return Err(AppError::BadRequest("Content-Type must be application/json".into()));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| AppError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

async fn file(State(app): State<AppState>, Path(project_id): Path<String>, call: InternalCall) -> Response {
    // Without a secret archives are public, as in the reference implementation.
    if app.verifier().secret().is_set()
        && let Err(e) = call.member(&app, None)
    {
        return e.into_response();
    }
    // A reference node (no cdtester header) gets the reference's layout: `<project_id>/...`.
    if header_str(&call.headers, auth::NODE_HEADER).is_none() {
        return match app.reference_file(&project_id) {
            Ok(bytes) => Response::builder()
                .header(header::CONTENT_TYPE, "application/zip")
                .header(header::CONTENT_DISPOSITION, format!("attachment; filename={project_id}.zip"))
                .body(Body::from(bytes.as_ref().clone()))
                .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            Err(e) => e.into_response(),
        };
    }
    match app.project_file(&project_id) {
        Ok((hash, bytes)) => Response::builder()
            .header(header::CONTENT_TYPE, "application/zip")
            .header(header::CONTENT_DISPOSITION, "attachment; filename=\"project.zip\"")
            .header("x-content-sha256", hash)
            .body(Body::from(bytes))
            .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => e.into_response(),
    }
}

fn answer<T: serde::Serialize>(result: Result<T, AppError>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn task(State(app): State<AppState>, call: InternalCall) -> Response {
    let accepted = async {
        let post: TaskPost = call.json()?;
        let caller = call.member(&app, Some(post.node()))?;
        crate::app::accept_result(&app, post, caller).await
    };
    answer(accepted.await.map(|status| json!({ "status": status })))
}

async fn replicate(State(app): State<AppState>, call: InternalCall) -> Response {
    answer(call.member(&app, None).and_then(|from| Ok(crate::app::replicate(&app, call.json()?, from))))
}

async fn results(State(app): State<AppState>, call: InternalCall) -> Response {
    let answers = call.member(&app, None).and_then(|caller| {
        let posts: Vec<TaskPost> = call.json()?;
        if posts.len() > crate::engine::MAX_BATCH {
            return Err(AppError::BadRequest(format!(
                "at most {} results per batch",
                crate::engine::MAX_BATCH
            )));
        }
        Ok(crate::app::accept_results(&app, posts, caller))
    });
    answer(answers)
}

async fn propose(State(app): State<AppState>, call: InternalCall) -> Response {
    answer(call.member(&app, None).and_then(|from| crate::app::propose(&app, call.json()?, from)))
}

async fn sync(State(app): State<AppState>, call: InternalCall) -> Response {
    answer(call.member(&app, None).and_then(|_| Ok(crate::app::answer_sync(&app, &call.json()?))))
}

async fn internal_evaluation(
    State(app): State<AppState>,
    Path(id): Path<String>,
    call: InternalCall,
) -> Response {
    answer(call.member(&app, None).and_then(|_| {
        parse_id(&id).and_then(|id| app.record(id).ok_or(AppError::NotFound("Evaluation not found".into())))
    }))
}
