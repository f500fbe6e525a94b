/* cdt_policy.h: the guest side of the cdtester WASM policy ABI v1, for C compiled with
 *   clang --target=wasm32 -nostdlib -O2 -Wl,--no-entry -Wl,--export-dynamic
 * (no libc: the module must import nothing). Include it in exactly one .c file per plugin.
 *
 * It provides the ABI marker, `memory` (exported by the linker), `cdt_alloc`, a bump allocator,
 * a small JSON reader (enough to read what the host sends: objects, arrays, strings, numbers,
 * literals) and a JSON writer for the output. A hook returns cdt_out(&w) or 0 ("no opinion").
 * Each call runs in a fresh instance, so nothing is ever freed. */
#ifndef CDT_POLICY_H
#define CDT_POLICY_H

typedef unsigned long size_t;
typedef long long i64;
typedef unsigned long long u64;

#define CDT_EXPORT(name) __attribute__((export_name(name)))

/* The ABI marker: the host refuses modules without cdt_policy_abi_v1. */
CDT_EXPORT("cdt_policy_abi_v1") void cdt_policy_abi_v1(void) {}

extern unsigned char __heap_base;
static unsigned char *cdt_brk = 0;

static inline void *cdt_malloc(size_t n) {
    if (!cdt_brk) cdt_brk = &__heap_base;
    unsigned char *p = (unsigned char *)(((size_t)cdt_brk + 7) & ~(size_t)7);
    size_t end = (size_t)p + n;
    size_t have = __builtin_wasm_memory_size(0) * 65536;
    if (end > have) {
        size_t pages = (end - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) __builtin_trap();
    }
    cdt_brk = (unsigned char *)end;
    return p;
}

CDT_EXPORT("cdt_alloc") int cdt_alloc(int len) { return (int)(size_t)cdt_malloc((size_t)len); }

/* ---- JSON reading: a value is a pointer into the input; `end` bounds every scan. ---- */
typedef struct { const char *p; const char *end; } cdt_json;

static inline const char *cdt_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

/* Returns the first byte after the value starting at p (after whitespace), or end on error. */
static inline const char *cdt_skip(const char *p, const char *end) {
    p = cdt_ws(p, end);
    if (p >= end) return end;
    if (*p == '"') {
        for (p++; p < end; p++) {
            if (*p == '\\') p++;
            else if (*p == '"') return p + 1;
        }
        return end;
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        for (; p < end; p++) {
            if (*p == '"') { p = cdt_skip(p, end) - 1; continue; }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') { if (--depth == 0) return p + 1; }
        }
        return end;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\n') p++;
    return p;
}

static inline int cdt_streq(const char *a, size_t n, const char *lit) {
    size_t i = 0;
    for (; i < n; i++) if (lit[i] == 0 || a[i] != lit[i]) return 0;
    return lit[i] == 0;
}

/* The value of `key` in object v (v.p at '{'), or {0,0}. Keys are compared byte for byte. */
static inline cdt_json cdt_get(cdt_json v, const char *key) {
    cdt_json none = {0, 0};
    const char *p = cdt_ws(v.p, v.end), *end = v.end;
    if (!p || p >= end || *p != '{') return none;
    p++;
    for (;;) {
        p = cdt_ws(p, end);
        if (p >= end || *p != '"') return none;
        const char *k = p + 1, *kend = cdt_skip(p, end) - 1;
        p = cdt_ws(kend + 1, end);
        if (p >= end || *p != ':') return none;
        p = cdt_ws(p + 1, end);
        if (cdt_streq(k, (size_t)(kend - k), key)) { cdt_json r = {p, end}; return r; }
        p = cdt_ws(cdt_skip(p, end), end);
        if (p >= end || *p != ',') return none;
        p++;
    }
}

/* Array iteration: cdt_first(arr) then cdt_next(elem) until .p == 0. */
static inline cdt_json cdt_first(cdt_json v) {
    cdt_json none = {0, 0};
    const char *p = cdt_ws(v.p, v.end);
    if (!p || p >= v.end || *p != '[') return none;
    p = cdt_ws(p + 1, v.end);
    if (p >= v.end || *p == ']') return none;
    cdt_json r = {p, v.end};
    return r;
}

static inline cdt_json cdt_next(cdt_json v) {
    cdt_json none = {0, 0};
    const char *p = cdt_ws(cdt_skip(v.p, v.end), v.end);
    if (p >= v.end || *p != ',') return none;
    cdt_json r = {cdt_ws(p + 1, v.end), v.end};
    return r;
}

/* String contents (escapes left as they are) of a string value; returns 0 if v is not one. */
static inline int cdt_str(cdt_json v, const char **s, size_t *n) {
    if (!v.p || v.p >= v.end || *v.p != '"') return 0;
    *s = v.p + 1;
    *n = (size_t)(cdt_skip(v.p, v.end) - 1 - *s);
    return 1;
}

/* A number value (integer, fraction, exponent); `ok` is set to 0 if v is not a number. */
static inline double cdt_num(cdt_json v, int *ok) {
    const char *p = v.p, *end = v.end;
    double sign = 1, x = 0, scale = 1;
    *ok = 0;
    if (!p || p >= end) return 0;
    if (*p == '-') { sign = -1; p++; }
    if (p >= end || *p < '0' || *p > '9') return 0;
    while (p < end && *p >= '0' && *p <= '9') x = x * 10 + (*p++ - '0');
    if (p < end && *p == '.') for (p++; p < end && *p >= '0' && *p <= '9'; p++) { scale /= 10; x += (*p - '0') * scale; }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int es = 1, e = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) { if (*p == '-') es = -1; p++; }
        while (p < end && *p >= '0' && *p <= '9') e = e * 10 + (*p++ - '0');
        while (e-- > 0) x = es > 0 ? x * 10 : x / 10;
    }
    *ok = 1;
    return sign * x;
}

static inline int cdt_starts(const char *s, size_t n, const char *prefix) {
    size_t i = 0;
    for (; prefix[i]; i++) if (i >= n || s[i] != prefix[i]) return 0;
    return 1;
}

/* ---- JSON writing into a growing buffer ---- */
typedef struct { char *buf; size_t len, cap; } cdt_writer;

static inline void cdt_putn(cdt_writer *w, const char *s, size_t n) {
    if (w->len + n > w->cap) {
        size_t cap = (w->cap ? w->cap * 2 : 256) + n;
        char *nb = (char *)cdt_malloc(cap);
        for (size_t i = 0; i < w->len; i++) nb[i] = w->buf[i];
        w->buf = nb;
        w->cap = cap;
    }
    for (size_t i = 0; i < n; i++) w->buf[w->len++] = s[i];
}

static inline void cdt_puts(cdt_writer *w, const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    cdt_putn(w, s, n);
}

static inline void cdt_put_uint(cdt_writer *w, u64 x) {
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + x % 10); x /= 10; } while (x);
    while (n) cdt_putn(w, &tmp[--n], 1);
}

/* Writes a non-negative number with two decimals, rounded. */
static inline void cdt_put_fixed2(cdt_writer *w, double x) {
    u64 cents = (u64)(x * 100.0 + 0.5);
    cdt_put_uint(w, cents / 100);
    char frac[3] = {'.', (char)('0' + (cents / 10) % 10), (char)('0' + cents % 10)};
    cdt_putn(w, frac, 3);
}

/* The hook return value for the writer's contents. */
static inline i64 cdt_out(cdt_writer *w) { return (i64)(((u64)(size_t)w->buf << 32) | (u64)w->len); }

/* The input of a hook as a JSON value. */
static inline cdt_json cdt_input(int ptr, int len) {
    cdt_json v = {(const char *)(size_t)ptr, (const char *)(size_t)ptr + len};
    return v;
}

#endif
