/* Policy "weighted grading by test name prefix" (hook grade).
 * Each test weighs by the prefix of its function name (the last `::` part of its node id):
 * `test_core_` 3, `test_extra_` 0.5, any other 1. The grade is
 *   20 * sum(weight of passed) / sum(weight of passed + failed)
 * where passed = passed|xpassed and failed = failed|error|timeout|oom|crashed (skipped, xfailed
 * and infra-error do not count), rounded to 2 decimals. Nothing gradable: no opinion. */
#include "cdt_policy.h"

static double weight(const char *id, size_t n) {
    size_t start = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (id[i] == ':' && id[i + 1] == ':') start = i + 2;
    if (cdt_starts(id + start, n - start, "test_core_")) return 3.0;
    if (cdt_starts(id + start, n - start, "test_extra_")) return 0.5;
    return 1.0;
}

static int is(const char *s, size_t n, const char *lit) { return cdt_streq(s, n, lit); }

CDT_EXPORT("cdt_grade") i64 cdt_grade(int ptr, int len) {
    cdt_json tests = cdt_get(cdt_input(ptr, len), "tests");
    double passed = 0, graded = 0;
    for (cdt_json t = cdt_first(tests); t.p; t = cdt_next(t)) {
        const char *id, *oc;
        size_t idn, ocn;
        if (!cdt_str(cdt_get(t, "nodeid"), &id, &idn) || !cdt_str(cdt_get(t, "outcome"), &oc, &ocn))
            __builtin_trap();
        double wt = weight(id, idn);
        if (is(oc, ocn, "passed") || is(oc, ocn, "xpassed")) {
            passed += wt;
            graded += wt;
        } else if (is(oc, ocn, "failed") || is(oc, ocn, "error") || is(oc, ocn, "timeout") ||
                   is(oc, ocn, "oom") || is(oc, ocn, "crashed")) {
            graded += wt;
        }
    }
    if (graded == 0) return 0;
    cdt_writer w = {0, 0, 0};
    cdt_puts(&w, "{\"grade\":");
    cdt_put_fixed2(&w, 20.0 * passed / graded);
    cdt_puts(&w, "}");
    return cdt_out(&w);
}
