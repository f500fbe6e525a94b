//! `GET /evaluation/{id}/events`: an evaluation's progress as server-sent events.
//!
//! Events (each `data` is one line of JSON):
//! - `report`: the report of `GET /evaluation/{id}?tests=false`, sent first and then whenever it
//!   changes;
//! - `network`: the document of `GET /network`, sent first and then whenever it changes;
//! - `end`: `{"status": "finished"}` once the evaluation is finished; the stream then closes.
//!
//! The node looks for changes every [`POLL`]. A stream lasts at most [`MAX_STREAM`] (browsers'
//! `EventSource` reconnects by itself) and at most [`MAX_STREAMS`] streams are open at once on a
//! node (503 beyond): an open stream keeps its connection busy, and the server's connection cap
//! must stay available to other clients.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::budget::StreamSlot;
use crate::app::App;
use crate::eval::EvalStatus;
use crate::ids::EvalId;

/// How often a stream looks for changes.
pub const POLL: Duration = Duration::from_millis(500);
/// The longest a stream stays open.
pub const MAX_STREAM: Duration = Duration::from_secs(300);
/// Streams open at once on one node.
pub const MAX_STREAMS: usize = 64;

/// What a stream has sent so far.
struct Follow {
    app: Arc<App>,
    id: EvalId,
    report: String,
    network: String,
    finished: bool,
    done: bool,
    until: Instant,
    _slots: (OwnedSemaphorePermit, StreamSlot),
}

impl Follow {
    /// The next event to send, if something changed.
    fn next_change(&mut self) -> Option<Event> {
        if self.finished {
            self.done = true;
            return Some(Event::default().event("end").data(r#"{"status":"finished"}"#));
        }
        let network = serde_json::to_string(&self.app.network()).unwrap_or_default();
        if network != self.network {
            self.network = network.clone();
            return Some(Event::default().event("network").data(network));
        }
        let Some(report) = self.app.report(self.id, false) else {
            self.done = true;
            return Some(Event::default().event("end").data(r#"{"status":"gone"}"#));
        };
        let finished = report.status == EvalStatus::Finished;
        let json = serde_json::to_string(&report).unwrap_or_default();
        if json != self.report {
            self.report = json.clone();
            self.finished = finished;
            return Some(Event::default().event("report").data(json));
        }
        None
    }
}

/// The event stream of evaluation `id` (which exists), holding its `slots` (the node's and the
/// client's) while it is open.
pub fn follow(
    app: Arc<App>,
    id: EvalId,
    slots: (OwnedSemaphorePermit, StreamSlot),
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let state = Follow {
        app,
        id,
        report: String::new(),
        network: String::new(),
        finished: false,
        done: false,
        until: Instant::now() + MAX_STREAM,
        _slots: slots,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if st.done || Instant::now() >= st.until {
                return None;
            }
            if let Some(event) = st.next_change() {
                return Some((Ok(event), st));
            }
            tokio::time::sleep(POLL).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
