//! `GET /metrics`: the node's metrics in the Prometheus text exposition format (version 0.0.4).
//!
//! Three sources, so that the application code needs no metrics plumbing:
//! - computed at scrape time from the public queries ([`App::list`], [`App::report`],
//!   [`App::network`]): evaluations, projects and tasks by state, tests by outcome, the task
//!   duration histogram, this node's queue and its live peers. These describe every evaluation
//!   this node holds (the network's, by replication), like `/stats`;
//! - counted by a middleware layer ([`instrument`]): HTTP requests by route and status (the
//!   route is the router's pattern, never the raw path, so hostile paths cannot grow the label
//!   set);
//! - process-wide event counters ([`crate::metrics`]), bumped by one-line calls where the events
//!   happen: failure detections, elections won or given up, runner errors.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cdtester_runner_api::{Counts, Outcome};

use crate::app::App;
use crate::eval::{EvalReport, EvalStatus, ModuleStatus};
use crate::ids::NodeAddr;

/// Upper bounds (seconds) of the task duration histogram's buckets.
pub const DURATION_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// HTTP requests served, by method, route pattern and status.
#[derive(Debug, Default)]
struct HttpCounters {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl HttpCounters {
    fn count(&self, method: &str, route: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((method.to_string(), route.to_string(), status)).or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<(String, String, u16), u64> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Adds `GET /metrics` to `router` and counts every request it serves (including `/metrics`).
pub fn instrument(router: Router, app: Arc<App>) -> Router {
    let http = Arc::new(HttpCounters::default());
    let last = Arc::new(LastScrape::default());
    let scrape = {
        let http = http.clone();
        move || {
            let (app, http, last) = (app.clone(), http.clone(), last.clone());
            async move { metrics_response(&app, &http, &last).await }
        }
    };
    router.route("/metrics", get(scrape)).layer(axum::middleware::from_fn_with_state(http, track))
}

/// The method as a label value: the standard ones by name, any other (clients may invent
/// methods) as `other`, so that the label set stays bounded.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN.iter().find(|(m, _)| m == method).map_or("other", |(_, name)| name)
}

async fn track(State(http): State<Arc<HttpCounters>>, req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    // Unmatched paths share one label value: the label set stays bounded.
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let response = next.run(req).await;
    http.count(method, &route, response.status().as_u16());
    response
}

/// The last scrape's text and when its making began. A scrape builds the report of every
/// evaluation the node holds and anyone can ask, so scrapes are made one at a time and a request
/// that waited for another's scrape begun after it arrived is answered with that one (still
/// exact for it): a flood of concurrent scrapes costs about two builds, not one each.
type LastScrape = tokio::sync::Mutex<Option<(Instant, Arc<str>)>>;

async fn metrics_response(app: &App, http: &HttpCounters, last: &LastScrape) -> Response {
    let arrived = Instant::now();
    let mut last = last.lock().await;
    let text = match last.as_ref() {
        Some((began, text)) if *began >= arrived => text.clone(),
        _ => {
            let began = Instant::now();
            let reports: Vec<EvalReport> =
                app.list().into_iter().filter_map(|id| app.report(id, false)).collect();
            let me = app.addr();
            let peers = app.network().get(&me.to_string()).map_or(0, Vec::len);
            let text: Arc<str> = render(&reports, me, peers, &http.snapshot()).into();
            *last = Some((began, text.clone()));
            text
        }
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text.to_string()).into_response()
}

/// Figures of the evaluations a node holds.
#[derive(Debug, Default)]
struct Tally {
    evaluations: BTreeMap<&'static str, u64>,
    projects: BTreeMap<&'static str, u64>,
    tasks: BTreeMap<&'static str, u64>,
    tests: Counts,
    queue: u64,
    /// Cumulative count per bucket of [`DURATION_BUCKETS`], then the total count and sum.
    buckets: [u64; DURATION_BUCKETS.len()],
    durations: u64,
    duration_sum: f64,
}

impl Tally {
    fn of(reports: &[EvalReport], me: NodeAddr) -> Tally {
        let mut t = Tally::default();
        for s in ["running", "finished"] {
            t.evaluations.insert(s, 0);
        }
        for s in ["preparing", "running", "finished", "failed"] {
            t.projects.insert(s, 0);
        }
        for s in ["pending", "running", "finished"] {
            t.tasks.insert(s, 0);
        }
        for r in reports {
            *t.evaluations.entry(r.status.as_str()).or_default() += 1;
            t.tests.merge(&r.summary.tests);
            if r.status == EvalStatus::Running && r.node == me {
                t.queue += r.summary.pending;
            }
            for p in r.projects.values() {
                *t.projects.entry(p.status.as_str()).or_default() += 1;
                for m in p.modules.values() {
                    *t.tasks.entry(m.status.as_str()).or_default() += 1;
                    if m.status == ModuleStatus::Finished {
                        t.observe(m.time);
                    }
                }
            }
        }
        t
    }

    fn observe(&mut self, secs: f64) {
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i] += 1;
            }
        }
        self.durations += 1;
        self.duration_sum += secs;
    }
}

/// One metric family: `# HELP`, `# TYPE` and its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// A label value escaped for the text format (backslash, double quote, newline).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn by_label(label: &str, map: &BTreeMap<&'static str, u64>) -> Samples {
    map.iter().map(|(k, v)| (format!("{{{label}=\"{k}\"}}"), v.to_string())).collect()
}

fn plain(v: u64) -> Samples {
    vec![(String::new(), v.to_string())]
}

/// Samples of one family: (labels, value).
type Samples = Vec<(String, String)>;

/// A family to write: name, type, help, samples.
type Family = (&'static str, &'static str, &'static str, Samples);

/// The families computed from the evaluation records.
fn tally_families(t: &Tally) -> Vec<Family> {
    let tests: Samples = Outcome::ALL
        .iter()
        .map(|o| (format!("{{outcome=\"{}\"}}", o.as_str()), t.tests.get(*o).to_string()))
        .collect();
    vec![
        (
            "cdtester_evaluations",
            "gauge",
            "Evaluations this node holds, by state.",
            by_label("state", &t.evaluations),
        ),
        (
            "cdtester_projects",
            "gauge",
            "Projects of those evaluations, by state.",
            by_label("state", &t.projects),
        ),
        (
            "cdtester_tasks",
            "gauge",
            "Tasks (test modules) of those evaluations, by state.",
            by_label("state", &t.tasks),
        ),
        ("cdtester_tests_total", "counter", "Test results accepted in those evaluations, by outcome.", tests),
        (
            "cdtester_task_duration_seconds",
            "histogram",
            "Wall-clock seconds of finished tasks.",
            histogram(t),
        ),
        ("cdtester_queue_length", "gauge", "Tasks waiting to be handed out by this node.", plain(t.queue)),
    ]
}

/// The families of this node's membership and event counters.
fn node_families(peers: usize) -> Vec<Family> {
    let n = crate::metrics::node().values();
    let elections = vec![
        ("{result=\"won\"}".to_string(), n.elections_won.to_string()),
        ("{result=\"relinquished\"}".to_string(), n.elections_relinquished.to_string()),
    ];
    vec![
        ("cdtester_peers_alive", "gauge", "Live peers this node talks to.", plain(peers as u64)),
        (
            "cdtester_failure_detections_total",
            "counter",
            "Peers this node saw declared failed.",
            plain(n.failure_detections),
        ),
        ("cdtester_elections_total", "counter", "Recovery elections this node won or gave up.", elections),
        (
            "cdtester_runner_errors_total",
            "counter",
            "Tasks this node could not run (fetch, preparation or runner failure).",
            plain(n.runner_errors),
        ),
    ]
}

fn http_samples(http: &BTreeMap<(String, String, u16), u64>) -> Samples {
    http.iter()
        .map(|((method, route, status), v)| {
            let labels = format!(
                "{{method=\"{}\",route=\"{}\",status=\"{status}\"}}",
                escape_label(method),
                escape_label(route)
            );
            (labels, v.to_string())
        })
        .collect()
}

/// The exposition text.
fn render(
    reports: &[EvalReport],
    me: NodeAddr,
    peers: usize,
    http: &BTreeMap<(String, String, u16), u64>,
) -> String {
    let mut families = tally_families(&Tally::of(reports, me));
    families.extend(node_families(peers));
    families.push((
        "cdtester_http_requests_total",
        "counter",
        "HTTP requests served, by method, route and status.",
        http_samples(http),
    ));
    let mut out = String::new();
    for (name, kind, help, samples) in &families {
        family(&mut out, name, kind, help, samples);
    }
    out
}

fn histogram(t: &Tally) -> Samples {
    let mut samples: Samples = DURATION_BUCKETS
        .iter()
        .zip(t.buckets)
        .map(|(bound, n)| (format!("_bucket{{le=\"{bound}\"}}"), n.to_string()))
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), t.durations.to_string()));
    samples.push(("_sum".into(), format!("{}", t.duration_sum)));
    samples.push(("_count".into(), t.durations.to_string()));
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let mut t = Tally::default();
        for secs in [0.0625, 0.25, 0.25, 7.0, 1000.0] {
            t.observe(secs);
        }
        let h = histogram(&t);
        let get = |k: &str| h.iter().find(|(l, _)| l == k).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(get("_bucket{le=\"0.1\"}"), "1");
        assert_eq!(get("_bucket{le=\"0.25\"}"), "3");
        assert_eq!(get("_bucket{le=\"10\"}"), "4");
        assert_eq!(get("_bucket{le=\"300\"}"), "4");
        assert_eq!(get("_bucket{le=\"+Inf\"}"), "5");
        assert_eq!(get("_count"), "5");
        assert_eq!(get("_sum"), "1007.5625");
    }

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&axum::http::Method::POST), "POST");
        let invented = axum::http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&invented), "other");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
