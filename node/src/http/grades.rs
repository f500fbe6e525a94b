//! `GET /evaluation/{id}/grades.csv`: one row per project of an evaluation, for a gradebook.
//!
//! Columns: `project,grade,passed,failed,errors,skipped,status,url,flaky`, from the same report as
//! `GET /evaluation/{id}`: `passed` = `total_passed` (passed + xpassed), `failed` + `errors` =
//! `total_failed` (`failed` = failed; `errors` = error, timeout, oom, crashed, as the CLI tables
//! group them; infra-errors, which grade nothing, are errors too),
//! `skipped` = skipped + xfailed, `grade` on 0..20 (empty until the project is graded), `flaky`
//! = tests that failed and then passed on a retry (counted in none of the other columns; the
//! grade counts them as `grading.flaky` says). `flaky` is last so that the columns before keep
//! their places.
//! Cells are quoted as RFC 4180 says, and a cell a spreadsheet would run as a formula (it starts
//! with `=`, `+`, `-`, `@`, tab or carriage return: project names come from students) is
//! prefixed with `'`.

use cdtester_runner_api::Counts;

use crate::eval::{Columns, EvalReport};

/// The header row.
pub const HEADER: [&str; 9] =
    ["project", "grade", "passed", "failed", "errors", "skipped", "status", "url", "flaky"];

/// `passed`, `failed`, `errors`, `skipped` of a project's counts: the tables' grouping
/// ([`Columns`]) with xpassed among the passes and xfailed among the skips, as grades count them.
pub fn columns(c: &Counts) -> [u64; 4] {
    let cols = Columns::of(c);
    [cols.passed + cols.xpassed, cols.failed, cols.errors, cols.skipped + cols.xfailed]
}

/// One cell, guarded against formula injection and quoted when it needs to be.
pub fn cell(value: &str) -> String {
    let guarded = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if guarded.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", guarded.replace('"', "\"\""))
    } else {
        guarded
    }
}

fn row(name: &str, grade: Option<f64>, tests: &Counts, status: &str, url: Option<&str>) -> String {
    let [passed, failed, errors, skipped] = columns(tests);
    let cells = [
        name.to_string(),
        grade.map(|g| g.to_string()).unwrap_or_default(),
        passed.to_string(),
        failed.to_string(),
        errors.to_string(),
        skipped.to_string(),
        status.to_string(),
        url.unwrap_or_default().to_string(),
        tests.flaky.to_string(),
    ];
    cells.iter().map(|c| cell(c)).collect::<Vec<_>>().join(",")
}

/// The CSV text (CRLF line ends, as RFC 4180 says), projects in the report's order.
pub fn grades_csv(report: &EvalReport) -> String {
    let mut out = HEADER.join(",");
    out.push_str("\r\n");
    for (name, p) in &report.projects {
        out.push_str(&row(name, p.grade, &p.tests, p.status.as_str(), p.url.as_deref()));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_neutralised_and_quoted_cells_escaped() {
        assert_eq!(cell("calc"), "calc");
        assert_eq!(cell("=HYPERLINK(\"http://x\")"), "\"'=HYPERLINK(\"\"http://x\"\")\"");
        assert_eq!(cell("+1"), "'+1");
        assert_eq!(cell("-2"), "'-2");
        assert_eq!(cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(cell("12.5"), "12.5");
    }

    #[test]
    fn columns_split_failures_into_failed_and_errors() {
        let c = Counts {
            passed: 3,
            xpassed: 1,
            failed: 2,
            timeout: 1,
            error: 4,
            skipped: 5,
            xfailed: 1,
            ..Counts::default()
        };
        assert_eq!(columns(&c), [4, 2, 5, 6]);
        assert_eq!(columns(&c)[1] + columns(&c)[2], c.failures());
    }
}
