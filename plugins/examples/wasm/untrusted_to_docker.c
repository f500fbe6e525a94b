/* Policy "untrusted repos go to docker" (hook select_runner).
 * A project fetched from a URL outside the trusted prefixes below runs in the `docker` runner
 * with tighter limits (60 s per module, 512 MiB, 128 pids). Projects without a URL (uploaded
 * zips, local directories) and trusted URLs get no opinion: the configured runner stays. */
#include "cdt_policy.h"

static const char *const TRUSTED[] = {"https://git.staff.example/", "file://", 0};

CDT_EXPORT("cdt_select_runner") i64 cdt_select_runner(int ptr, int len) {
    cdt_json url = cdt_get(cdt_get(cdt_input(ptr, len), "project"), "url");
    const char *s;
    size_t n;
    if (!cdt_str(url, &s, &n)) return 0;
    for (int i = 0; TRUSTED[i]; i++)
        if (cdt_starts(s, n, TRUSTED[i])) return 0;
    cdt_writer w = {0, 0, 0};
    cdt_puts(&w, "{\"runner\":\"docker\",\"limits\":{\"timeout_s\":60,\"memory_mb\":512,\"pids\":128}}");
    return cdt_out(&w);
}
