//! The one rendering of an evaluation report ([`EvalReport`]) for people and CI: the results
//! table and JUnit XML, the same for `cdtester run`, `cdtester submit --wait`, `status` and
//! `watch`.

use std::fmt::Write as _;

use cdtester_runner_api::{Counts, Outcome, round2};

use crate::eval::{Columns, EvalReport, ModuleStatus, ProjectStatus};

fn grade_text(g: Option<f64>) -> String {
    g.map_or_else(|| "-".to_string(), |g| format!("{g:.2}/20"))
}

/// The results table: per project its status, grade and one row per module (passed, failed,
/// skipped, errors, xfail, other = xpassed, time; outcomes grouped as [`Columns`] says), then
/// the totals.
pub fn table(r: &EvalReport) -> String {
    let mut s = String::new();
    for (name, p) in &r.projects {
        let runner = p.runner.as_deref().map(|r| format!(", runner {r}")).unwrap_or_default();
        let _ = writeln!(s, "project {name} ({}{runner}): grade {}", p.status.as_str(), grade_text(p.grade));
        if let Some(e) = &p.error {
            let _ = writeln!(s, "  error: {e}\n");
            continue;
        }
        let width = p.modules.keys().map(String::len).max().unwrap_or(6).max(6);
        let _ = writeln!(
            s,
            "  {:<width$} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}",
            "module", "passed", "failed", "skipped", "errors", "xfail", "other", "time"
        );
        let row = |s: &mut String, name: &str, c: &Counts, t: f64| {
            let c = Columns::of(c);
            let _ = writeln!(
                s,
                "  {:<width$} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7.2}s",
                name, c.passed, c.failed, c.skipped, c.errors, c.xfailed, c.xpassed, t
            );
        };
        for (m, v) in &p.modules {
            row(&mut s, m, &v.counts, v.time);
            if v.status != ModuleStatus::Finished {
                let _ = writeln!(s, "      {}", v.status.as_str());
            }
            if let Some(note) = &v.note {
                let _ = writeln!(s, "      note: {note}");
            }
        }
        row(&mut s, "total", &p.tests, round2(p.modules.values().map(|m| m.time).sum()));
        let _ = writeln!(s);
    }
    let (c, sum) = (&r.summary.tests, &r.summary);
    let _ = writeln!(
        s,
        "overall: {} project(s), {} tests: {} passed, {} failed, {} errors, {} skipped ({}% passed); grade {} in {:.2} s",
        r.projects.len(),
        c.total(),
        c.passes(),
        c.failed,
        Columns::of(c).errors,
        c.skipped,
        sum.pass_percentage,
        grade_text(sum.grade),
        r.time_elapsed
    );
    s
}

/// XML-escapes `text` for attributes and text nodes, dropping characters XML 1.0 forbids.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                let _ = write!(out, "#x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// pytest's `classname`/`name` split of a node id: `a/b.py::C::t[1]` -> (`a.b.C`, `t[1]`).
fn junit_names(nodeid: &str) -> (String, String) {
    let mut parts: Vec<String> = nodeid.split("::").map(str::to_string).collect();
    if let Some(first) = parts.first_mut() {
        *first = first.trim_end_matches(".py").replace('/', ".");
    }
    let name = parts.pop().unwrap_or_default();
    (parts.join("."), name)
}

/// One `<testcase>` of a test result.
fn testcase(s: &mut String, t: &cdtester_runner_api::TestResult) {
    let (classname, name) = junit_names(&t.nodeid);
    let msg = xml_escape(t.message.as_deref().unwrap_or(""));
    let _ = write!(
        s,
        "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
        xml_escape(&classname),
        xml_escape(&name),
        t.duration
    );
    let child = match t.outcome {
        Outcome::Passed | Outcome::Xpassed => None,
        Outcome::Failed => Some(format!("<failure message=\"{msg}\">{msg}</failure>")),
        Outcome::Skipped => Some(format!("<skipped type=\"pytest.skip\" message=\"{msg}\">{msg}</skipped>")),
        Outcome::Xfailed => Some(format!("<skipped type=\"pytest.xfail\" message=\"{msg}\"/>")),
        // Passed on a retry: each earlier attempt that did not pass, as Surefire writes reruns.
        Outcome::Flaky => Some(
            t.attempts
                .iter()
                .filter(|a| !a.outcome.is_pass())
                .map(|a| {
                    let m = xml_escape(a.message.as_deref().unwrap_or(""));
                    format!("<flakyFailure message=\"{}: {m}\">{m}</flakyFailure>", a.outcome)
                })
                .collect(),
        ),
        other => Some(format!("<error message=\"{other}: {msg}\">{msg}</error>")),
    };
    match child {
        None => s.push_str("/>\n"),
        Some(c) => {
            let _ = writeln!(s, ">{c}</testcase>");
        }
    }
}

/// JUnit XML following pytest's `--junitxml` conventions: one `<testsuite>` per project, one
/// `<testcase>` per test (from a report with per-test results), `<failure>` for failed,
/// `<error>` for errors (and timeout / crashed / oom / infra-error verdicts), `<skipped>` for
/// skips and xfails; a project that could not be evaluated is one `<error>` testcase.
pub fn junit_xml(r: &EvalReport) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<testsuites name=\"cdtester\">\n");
    for (name, p) in &r.projects {
        let c = &p.tests;
        let failed = p.status == ProjectStatus::Failed;
        let _ = writeln!(
            s,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.3}\">",
            xml_escape(name),
            c.total(),
            c.failed,
            Columns::of(c).errors + u64::from(failed),
            c.skipped + c.xfailed,
            p.modules.values().map(|m| m.time).sum::<f64>()
        );
        if failed {
            let _ = writeln!(
                s,
                "    <testcase classname=\"\" name=\"{}\" time=\"0\"><error message=\"{}\"/></testcase>",
                xml_escape(name),
                xml_escape(p.error.as_deref().unwrap_or("not evaluated"))
            );
        }
        for t in p.modules.values().flat_map(|m| m.tests.iter().flatten()) {
            testcase(&mut s, t);
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

#[cfg(test)]
mod tests {
    use cdtester_runner_api::TestResult;

    use super::*;
    use crate::eval::tests::{module_report, ready, result as module_result};
    use crate::eval::{EvalRecord, build_report};
    use crate::ids::{EvalId, NodeAddr, TaskId};

    fn result(nodeid: &str, outcome: Outcome, msg: Option<&str>) -> TestResult {
        TestResult::new(nodeid, outcome, 0.1, msg.map(str::to_string))
    }

    /// A finished report of one project `p<1>` with one module holding `tests`.
    fn report_of(module: &str, tests: Vec<TestResult>) -> EvalReport {
        let mut rec = EvalRecord::new(
            EvalId::test(7),
            NodeAddr::test("127.0.0.1:1"),
            1.0,
            vec![ready("7-0", "p<1>", &[module])],
        );
        let mut report = module_report(module, &[]);
        report.tests = tests;
        rec.add_result(
            &TaskId::test(&format!("7-0::{module}")),
            module_result("127.0.0.1:1", "a", report),
            2.0,
        );
        build_report(&rec, 3.0, true, &|_, tests| {
            let mut c = Counts::default();
            tests.iter().for_each(|t| c.add(t.outcome));
            c.grade()
        })
    }

    #[test]
    fn junit_follows_pytest_conventions() {
        let r = report_of(
            "tests/test_a.py",
            vec![
                result("tests/test_a.py::TestX::test_ok", Outcome::Passed, None),
                result("tests/test_a.py::test_bad[<1>]", Outcome::Failed, Some("assert 1 == 2 & \"x\"")),
                result("tests/test_a.py::test_skip", Outcome::Skipped, Some("no db")),
                result("tests/test_a.py::test_xf", Outcome::Xfailed, Some("known")),
                result("tests/test_a.py::test_hang", Outcome::Timeout, Some("timed out")),
            ],
        );
        let xml = junit_xml(&r);
        assert!(
            xml.contains(
                "<testsuite name=\"p&lt;1&gt;\" tests=\"5\" failures=\"1\" errors=\"1\" skipped=\"2\""
            ),
            "{xml}"
        );
        assert!(xml.contains("classname=\"tests.test_a.TestX\" name=\"test_ok\" time=\"0.100\"/>"), "{xml}");
        assert!(xml.contains("name=\"test_bad[&lt;1&gt;]\""), "{xml}");
        assert!(xml.contains("<failure message=\"assert 1 == 2 &amp; &quot;x&quot;\">"), "{xml}");
        assert!(xml.contains("<skipped type=\"pytest.xfail\" message=\"known\"/>"), "{xml}");
        assert!(xml.contains("<error message=\"timeout: timed out\">"), "{xml}");
        assert_eq!(xml.matches("<testcase").count(), 5);
    }

    #[test]
    fn junit_writes_a_flaky_test_as_a_pass_with_its_failed_attempts() {
        let mut flaky = result("tests/test_a.py::test_once", Outcome::Flaky, None);
        flaky.attempts = vec![
            cdtester_runner_api::Attempt {
                outcome: Outcome::Failed,
                duration: 0.1,
                message: Some("boom <1>".into()),
            },
            cdtester_runner_api::Attempt { outcome: Outcome::Passed, duration: 0.1, message: None },
        ];
        let xml = junit_xml(&report_of("tests/test_a.py", vec![flaky]));
        assert!(xml.contains("failures=\"0\" errors=\"0\""), "{xml}");
        assert!(
            xml.contains(
                "><flakyFailure message=\"failed: boom &lt;1&gt;\">boom &lt;1&gt;</flakyFailure></testcase>"
            ),
            "{xml}"
        );
        assert_eq!(xml.matches("flakyFailure message").count(), 1, "{xml}");
    }

    #[test]
    fn table_shows_modules_totals_and_grade() {
        let r = report_of(
            "tests/test_a.py",
            ["a", "b", "c", "d"]
                .iter()
                .zip([Outcome::Passed, Outcome::Passed, Outcome::Passed, Outcome::Error])
                .map(|(name, outcome)| result(&format!("tests/test_a.py::{name}"), outcome, None))
                .collect(),
        );
        let t = table(&r);
        assert!(t.contains("project p<1> (finished, runner local): grade 15.00/20"), "{t}");
        assert!(t.contains("tests/test_a.py"), "{t}");
        assert!(t.lines().any(|l| l.trim_start().starts_with("total") && l.contains(" 3 ")), "{t}");
        assert!(t.contains("overall: 1 project(s), 4 tests: 3 passed, 0 failed, 1 errors"), "{t}");
    }

    #[test]
    fn xml_escape_drops_control_characters() {
        assert_eq!(xml_escape("a\u{1b}[31mb"), "a#x1B[31mb");
    }
}
