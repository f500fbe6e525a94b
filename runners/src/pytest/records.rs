//! Parsing the reporting plugin's records and turning them into per-module reports.

use std::collections::{BTreeMap, HashMap, HashSet};

use cdtester_runner_api::{Chunk, ModuleReport, Outcome, TestResult};
use serde::Deserialize;

use super::MARK;

/// One line the plugin wrote.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "e")]
pub enum Record {
    /// A collected item (after deselection and chunking).
    #[serde(rename = "item")]
    Item {
        id: String,
        #[serde(rename = "m")]
        module: String,
    },
    /// A test or collection report with its terminal-summary category (`""` = not counted).
    #[serde(rename = "r")]
    Report {
        id: String,
        #[serde(rename = "m")]
        module: String,
        #[serde(rename = "w")]
        when: String,
        #[serde(rename = "c")]
        category: String,
        #[serde(rename = "d", default)]
        duration: f64,
        #[serde(default)]
        msg: Option<String>,
    },
    /// The session finished with this exit status.
    #[serde(rename = "end")]
    End { exit: i32 },
}

/// Extracts every record from `text` (a record file, or output the records were mixed into).
/// Lines that are not records, or records that do not parse, are skipped.
pub fn parse_records(text: &str) -> Vec<Record> {
    text.lines()
        .filter_map(|line| {
            let at = line.find(MARK)?;
            match serde_json::from_str::<Record>(&line[at + MARK.len()..]) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::debug!(error = %e, "skipping malformed report record");
                    None
                }
            }
        })
        .collect()
}

/// What a collect-only run found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Discovery {
    /// Test modules, sorted: files with collected items, a collection error or a collection skip.
    pub modules: Vec<String>,
    /// Items collected per module.
    pub items: BTreeMap<String, usize>,
    /// The collect-only session's exit status, when it finished.
    pub exit: Option<i32>,
}

/// Reads a collect-only run's records.
pub fn parse_discovery(text: &str) -> Discovery {
    let mut d = Discovery::default();
    let mut modules = std::collections::BTreeSet::new();
    for rec in parse_records(text) {
        match rec {
            Record::Item { module, .. } => {
                *d.items.entry(module.clone()).or_default() += 1;
                modules.insert(module);
            }
            Record::Report { module, when, .. } if when == "collect" && !module.is_empty() => {
                modules.insert(module);
            }
            Record::Report { .. } => {}
            Record::End { exit } => d.exit = Some(exit),
        }
    }
    d.modules = modules.into_iter().collect();
    d
}

/// How the pytest process ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// It exited with this status.
    Exited(i32),
    /// It was killed by this signal (not by us).
    Signalled(i32),
    /// It ran past the wall-clock limit (seconds) and was killed.
    TimedOut(u64),
}

impl RunEnd {
    fn describe(&self) -> String {
        match self {
            RunEnd::Exited(code) => format!("pytest exited {code} ({})", exit_meaning(*code)),
            RunEnd::Signalled(sig) => format!("the interpreter was killed by signal {sig}"),
            RunEnd::TimedOut(limit) => format!("timed out after {limit} s and was killed"),
        }
    }
}

/// pytest's exit codes.
fn exit_meaning(code: i32) -> &'static str {
    match code {
        0 => "all tests passed",
        1 => "some tests failed",
        2 => "interrupted",
        3 => "internal error",
        4 => "usage error or conftest failed to load",
        5 => "no tests collected",
        _ => "the interpreter exited early",
    }
}

fn outcome_of(category: &str) -> Option<Outcome> {
    Some(match category {
        "passed" => Outcome::Passed,
        "failed" => Outcome::Failed,
        "error" => Outcome::Error,
        "skipped" => Outcome::Skipped,
        "xfailed" => Outcome::Xfailed,
        "xpassed" => Outcome::Xpassed,
        _ => return None,
    })
}

/// Builds one report per module of `modules` (in that order; modules the records mention but
/// the list does not are appended) from a run's records and how the run ended.
///
/// A finished session counts exactly what pytest's summary counts. A session that did not finish
/// (timeout, a dying interpreter) keeps every verdict already reported and gives each unfinished
/// item `timeout` or `crashed`. A module left with nothing while pytest failed as a whole gets one
/// `error` (or `timeout`/`crashed`) entry named after the module, so it never looks clean.
/// `duration`, `output` and `output_truncated` are left for the caller to fill.
pub fn build_reports(
    modules: &[String],
    records: &[Record],
    end: &RunEnd,
    chunk: Option<Chunk>,
) -> Vec<ModuleReport> {
    let mut order: Vec<String> = modules.to_vec();
    let mut index: HashMap<String, usize> = modules.iter().enumerate().map(|(i, m)| (m.clone(), i)).collect();
    let mut slot = |m: &str, order: &mut Vec<String>| -> usize {
        if let Some(i) = index.get(m) {
            return *i;
        }
        order.push(m.to_string());
        index.insert(m.to_string(), order.len() - 1);
        order.len() - 1
    };

    let mut items: Vec<Vec<String>> = vec![Vec::new(); order.len()];
    let mut tests: Vec<Vec<TestResult>> = vec![Vec::new(); order.len()];
    let mut counted: HashSet<String> = HashSet::new();
    let mut total_time: HashMap<String, f64> = HashMap::new();
    let mut first_result: HashMap<String, (usize, usize)> = HashMap::new();
    let mut finished = None;

    for rec in records {
        match rec {
            Record::Item { id, module } => {
                let i = slot(module, &mut order);
                items.resize(order.len(), Vec::new());
                items[i].push(id.clone());
            }
            Record::Report { id, module, category, duration, msg, .. } => {
                let i = slot(module, &mut order);
                tests.resize(order.len(), Vec::new());
                *total_time.entry(id.clone()).or_default() += duration;
                if let Some(outcome) = outcome_of(category) {
                    counted.insert(id.clone());
                    first_result.entry(id.clone()).or_insert((i, tests[i].len()));
                    tests[i].push(TestResult {
                        nodeid: id.clone(),
                        outcome,
                        duration: *duration,
                        message: msg.clone(),
                        attempts: Vec::new(),
                    });
                }
            }
            Record::End { exit } => finished = Some(*exit),
        }
    }
    items.resize(order.len(), Vec::new());
    tests.resize(order.len(), Vec::new());
    // A test's first result carries the time of all its phases (setup + call + teardown).
    for (id, (i, j)) in &first_result {
        tests[*i][*j].duration = total_time[id];
    }

    let first_chunk = chunk.is_none_or(|c| c.index == 0);
    let mut reports = Vec::with_capacity(order.len());
    for (i, module) in order.into_iter().enumerate() {
        let mut results = std::mem::take(&mut tests[i]);
        let note = match finished {
            Some(exit) => exited_without_result(&module, &mut results, exit, first_chunk),
            None => {
                let unfinished = items[i].iter().filter(|id| !counted.contains(*id));
                Some(cut_short(&module, &mut results, unfinished, end, items[i].is_empty(), first_chunk))
            }
        };
        reports.push(ModuleReport {
            module,
            tests: results,
            duration: 0.0,
            note,
            output: None,
            output_truncated: false,
        });
    }
    reports
}

/// A module of a run that ended with `exit`: when it has no result and pytest failed as a whole,
/// one `error` entry named after it (in the first chunk only); the note says why.
fn exited_without_result(
    module: &str,
    results: &mut Vec<TestResult>,
    exit: i32,
    first_chunk: bool,
) -> Option<String> {
    if !results.is_empty() || [0, 1, 5].contains(&exit) || !first_chunk {
        return None;
    }
    let why = format!("no result: {}", RunEnd::Exited(exit).describe());
    results.push(TestResult::new(module, Outcome::Error, 0.0, Some(why.clone())));
    Some(why)
}

/// A module of a run that never finished (`end`): each unfinished item gets `timeout`, `crashed`
/// or (a collection error) `error`; a module left with nothing gets one such entry named after it
/// (in the first chunk only). Returns the note.
fn cut_short<'a>(
    module: &str,
    results: &mut Vec<TestResult>,
    unfinished: impl Iterator<Item = &'a String>,
    end: &RunEnd,
    no_items: bool,
    first_chunk: bool,
) -> String {
    let (outcome, why) = match end {
        RunEnd::TimedOut(_) => (Outcome::Timeout, end.describe()),
        RunEnd::Exited(code @ 2..=4) if no_items => (Outcome::Error, RunEnd::Exited(*code).describe()),
        _ => (Outcome::Crashed, format!("{} before the test finished", end.describe())),
    };
    let entry = |nodeid: String| TestResult::new(nodeid, outcome, 0.0, Some(why.clone()));
    results.extend(unfinished.map(|id| entry(id.clone())));
    if results.is_empty() && first_chunk {
        results.push(entry(module.to_string()));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str) -> String {
        format!("{MARK}{json}\n")
    }

    fn item(id: &str) -> String {
        let m = id.split("::").next().unwrap();
        rec(&format!(r#"{{"e":"item","id":"{id}","m":"{m}"}}"#))
    }

    fn report(id: &str, when: &str, cat: &str) -> String {
        let m = id.split("::").next().unwrap();
        rec(&format!(r#"{{"e":"r","id":"{id}","m":"{m}","w":"{when}","c":"{cat}","d":0.5,"msg":null}}"#))
    }

    fn full(id: &str, cat: &str) -> String {
        report(id, "setup", "") + &report(id, "call", cat) + &report(id, "teardown", "")
    }

    #[test]
    fn records_are_found_inside_mixed_output_and_garbage_is_skipped() {
        let text = format!(
            "noise\npartial line{}{}not json {MARK}{{bad\n",
            item("t.py::a"),
            rec(r#"{"e":"end","exit":0}"#)
        );
        let recs = parse_records(&text);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1], Record::End { exit: 0 });
    }

    #[test]
    fn finished_run_counts_what_pytest_counts() {
        let text = [
            item("t.py::a"),
            item("t.py::b"),
            item("t.py::c"),
            full("t.py::a", "passed"),
            report("t.py::b", "setup", "skipped"),
            report("t.py::b", "teardown", ""),
            report("t.py::c", "setup", ""),
            report("t.py::c", "call", "failed"),
            report("t.py::c", "teardown", "error"),
            rec(r#"{"e":"end","exit":1}"#),
        ]
        .concat();
        let reports = build_reports(&["t.py".into()], &parse_records(&text), &RunEnd::Exited(1), None);
        assert_eq!(reports.len(), 1);
        let c = reports[0].counts();
        assert_eq!((c.passed, c.skipped, c.failed, c.error, c.total()), (1, 1, 1, 1, 4));
        assert_eq!(reports[0].tests[0].duration, 1.5, "first result sums all phases");
        assert!(reports[0].note.is_none());
    }

    #[test]
    fn timeout_keeps_finished_verdicts_and_marks_the_rest() {
        let text = [
            item("t.py::a"),
            item("t.py::b"),
            item("t.py::c"),
            full("t.py::a", "failed"),
            report("t.py::b", "setup", ""),
        ]
        .concat();
        let reports = build_reports(&["t.py".into()], &parse_records(&text), &RunEnd::TimedOut(5), None);
        let c = reports[0].counts();
        assert_eq!((c.failed, c.timeout, c.total()), (1, 2, 3));
        assert!(reports[0].note.as_deref().unwrap().contains("timed out after 5 s"));
    }

    #[test]
    fn dying_interpreter_gives_crashed_and_exit_zero_without_end_is_a_crash() {
        let text = [item("t.py::a"), item("t.py::b"), full("t.py::a", "passed")].concat();
        for end in [RunEnd::Signalled(9), RunEnd::Exited(0)] {
            let reports = build_reports(&["t.py".into()], &parse_records(&text), &end, None);
            let c = reports[0].counts();
            assert_eq!((c.passed, c.crashed), (1, 1), "{end:?}");
        }
    }

    #[test]
    fn pytest_failing_before_collection_gives_one_error_per_module() {
        let reports = build_reports(&["a.py".into(), "b.py".into()], &[], &RunEnd::Exited(4), None);
        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r.tests.len(), 1);
            assert_eq!(r.tests[0].outcome, Outcome::Error);
            assert!(r.tests[0].message.as_deref().unwrap().contains("usage error"));
        }
    }

    #[test]
    fn collection_error_counts_once_and_later_chunks_add_nothing() {
        let text = [
            rec(r#"{"e":"r","id":"t.py","m":"t.py","w":"collect","c":"error","d":0,"msg":"ImportError: x"}"#),
            rec(r#"{"e":"end","exit":2}"#),
        ]
        .concat();
        let recs = parse_records(&text);
        let reports = build_reports(&["t.py".into()], &recs, &RunEnd::Exited(2), None);
        assert_eq!(reports[0].counts().error, 1);
        assert_eq!(reports[0].tests[0].message.as_deref(), Some("ImportError: x"));
        let later = build_reports(
            &["t.py".into()],
            &parse_records(&rec(r#"{"e":"end","exit":2}"#)),
            &RunEnd::Exited(2),
            Some(Chunk { index: 1, count: 2 }),
        );
        assert_eq!(later[0].tests.len(), 0);
    }

    #[test]
    fn no_tests_is_not_an_error_and_unknown_modules_are_appended() {
        let text = rec(r#"{"e":"end","exit":5}"#);
        let reports = build_reports(&["t.py".into()], &parse_records(&text), &RunEnd::Exited(5), None);
        assert!(reports[0].tests.is_empty());
        let text = [item("x/t.py::a"), full("x/t.py::a", "xfailed"), rec(r#"{"e":"end","exit":0}"#)].concat();
        let reports = build_reports(&["t.py".into()], &parse_records(&text), &RunEnd::Exited(0), None);
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[1].module, "x/t.py");
        assert_eq!(reports[1].counts().xfailed, 1);
    }

    #[test]
    fn discovery_lists_item_modules_and_collection_problems() {
        let text = [
            item("b/t_2.py::x"),
            item("b/t_2.py::y"),
            item("a_test.py::z"),
            rec(r#"{"e":"r","id":"c.py","m":"c.py","w":"collect","c":"skipped","d":0}"#),
            rec(r#"{"e":"end","exit":0}"#),
        ]
        .concat();
        let d = parse_discovery(&text);
        assert_eq!(d.modules, ["a_test.py", "b/t_2.py", "c.py"]);
        assert_eq!(d.items["b/t_2.py"], 2);
        assert_eq!(d.exit, Some(0));
    }
}
