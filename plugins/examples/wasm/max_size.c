/* Policy "reject projects over N MB" (hook admit).
 * Rejects a project whose files total more than MAX_BYTES (5 MiB) or that has more than
 * MAX_FILES files, with a reason naming its size. Smaller projects get no opinion, so later
 * policies in the chain are still asked (and by default a project is accepted). */
#include "cdt_policy.h"

#define MAX_BYTES (5.0 * 1024 * 1024)
#define MAX_FILES 5000.0

CDT_EXPORT("cdt_admit") i64 cdt_admit(int ptr, int len) {
    cdt_json project = cdt_get(cdt_input(ptr, len), "project");
    int ok_size, ok_files;
    double size = cdt_num(cdt_get(project, "size_bytes"), &ok_size);
    double files = cdt_num(cdt_get(project, "file_count"), &ok_files);
    if (!ok_size || !ok_files) __builtin_trap(); /* malformed input: let the host report it */
    if (size <= MAX_BYTES && files <= MAX_FILES) return 0;
    cdt_writer w = {0, 0, 0};
    cdt_puts(&w, "{\"admit\":false,\"reason\":\"project is ");
    if (size > MAX_BYTES) {
        cdt_put_fixed2(&w, size / (1024.0 * 1024.0));
        cdt_puts(&w, " MiB, over the 5 MiB limit\"}");
    } else {
        cdt_put_uint(&w, (u64)files);
        cdt_puts(&w, " files, over the 5000-file limit\"}");
    }
    return cdt_out(&w);
}
