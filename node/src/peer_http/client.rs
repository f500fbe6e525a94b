//! A small HTTP/1.1 client (hyper-util) for node-to-node calls and the CLI client: JSON and
//! byte bodies, per-request timeouts, and the cluster MAC header on internal calls.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::auth::{CallParts, MAC_HEADER, NODE_HEADER, NONCE_HEADER, Secret, TIME_HEADER};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("request to {url} timed out after {secs:.1} s")]
    Timeout { url: String, secs: f64 },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: StatusCode, body: String },
    #[error("{url} sent an invalid response: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A response: status, headers we care about, body bytes.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// How long an idle pooled connection is kept: below the servers' header timeout
/// (`intake.header_timeout_s`, 10 s by default), so the client does not reuse a connection the
/// server is about to close.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// Cheap to clone; shares the connection pool.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    secret: Secret,
    /// This node's UDP address, sent as the caller's identity on internal calls.
    me: Option<String>,
    /// Largest answer body read (see [`HttpClient::capped`]).
    max_body: usize,
}

impl HttpClient {
    pub fn new(secret: Secret, me: Option<String>) -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        connector.set_nodelay(true);
        let inner = Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).build(connector);
        HttpClient { inner, secret, me, max_body: usize::MAX }
    }

    /// This client, refusing answers whose body exceeds `max_body` bytes (for servers that
    /// cannot be trusted to send a bounded one).
    pub fn capped(mut self, max_body: usize) -> HttpClient {
        self.max_body = max_body;
        self
    }

    /// Sends a request; `body` with `content_type`. Non-2xx answers are errors.
    pub async fn send(
        &self,
        method: Method,
        addr: SocketAddr,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let url = format!("http://{addr}{path}");
        let mut req = Request::builder().method(method.clone()).uri(&url);
        let bytes = match body {
            Some((ct, b)) => {
                req = req.header(hyper::header::CONTENT_TYPE, ct);
                b
            }
            None => Vec::new(),
        };
        if let Some(me) = &self.me {
            req = req.header(NODE_HEADER, me);
            let host = addr.to_string();
            let call = CallParts { method: method.as_str(), host: &host, path, caller: me, body: &bytes };
            if let Some(sig) = self.secret.sign(&call) {
                req = req
                    .header(MAC_HEADER, sig.mac)
                    .header(TIME_HEADER, sig.time_ms.to_string())
                    .header(NONCE_HEADER, sig.nonce);
            }
        }
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Transport { url: url.clone(), reason: e.to_string() })?;
        let fut = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| ClientError::Transport { url: url.clone(), reason: error_chain(&e) })?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, self.max_body)
                .collect()
                .await
                .map_err(|e| ClientError::Transport { url: url.clone(), reason: e.to_string() })?
                .to_bytes();
            Ok(Response { status: parts.status, headers: parts.headers, body })
        };
        let resp = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { url: url.clone(), secs: timeout.as_secs_f64() })??;
        if !resp.status.is_success() {
            let body = String::from_utf8_lossy(&resp.body).chars().take(500).collect();
            return Err(ClientError::Status { url, status: resp.status, body });
        }
        Ok(resp)
    }

    /// GET returning JSON.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let resp = self.send(Method::GET, addr, path, None, timeout).await?;
        decode(addr, path, &resp.body)
    }

    /// POST a JSON body, JSON answer.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Transport {
            url: format!("http://{addr}{path}"),
            reason: format!("encoding the body: {e}"),
        })?;
        let resp = self.send(Method::POST, addr, path, Some(("application/json", bytes)), timeout).await?;
        decode(addr, path, &resp.body)
    }
}

fn decode<T: DeserializeOwned>(addr: SocketAddr, path: &str, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body)
        .map_err(|e| ClientError::Decode { url: format!("http://{addr}{path}"), reason: e.to_string() })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Builds a `multipart/form-data` body with one file field; returns (content type, body).
pub fn multipart_file(field: &str, filename: &str, data: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!("cdtester-{:016x}", rand::random::<u64>());
    let mut body = Vec::with_capacity(data.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\nContent-Type: application/zip\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
