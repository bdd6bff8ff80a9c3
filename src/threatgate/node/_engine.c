/* threatgate's compiled matching engine: one call matches a batch of events.
 *
 * Invariants (docs/architecture.md, "The compiled engine"):
 * 1. Same answers as the reference matcher (node/matcher.py), byte for byte.  The engine decides alone only
 *    what it can prove: an ASCII event whose every extracted value misses every index (the Bloom bitmap, then
 *    the sorted keys, the CIDR intervals, the mask hosts) gets its finished line here.  Every other event --
 *    a value that may be an indicator, bytes outside ASCII, an oversized event, a replace or ignore rule that
 *    changes it, a regex error or limit -- is handed, in order, to the reference callback (Matcher.match_one),
 *    so every detection is decided and rendered by one definition.
 * 2. Probing is a superset of the reference store's probes: a "maybe" can only cost a reference run, never a
 *    lost detection.  Store keys are XXH3-64 of the value's UTF-8 bytes with seed = kind (feeds.Kind).
 * 3. Regexes are PCRE2, generated from Python's parse tree by node/pcre.py and exact for ASCII subjects only.
 *    findall/finditer follow Python's empty-match rule (PCRE2_NOTEMPTY_ATSTART after an empty match).
 * 4. One thread at a time: the engine's buffers (match data, scratch) are its own, and the node calls it from
 *    the event loop only; a batch is copied first, since the Python callbacks may let other threads run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#define XXH_INLINE_ALL
#include "xxhash.h"

enum { K_URL = 0, K_DOMAIN = 1, K_DOMAIN_SUFFIX = 2, K_IP = 3, K_CIDR = 4, K_HASH = 5, K_MASK = 6 };
enum { L_CONTEXT = -1, L_URL = 0, L_DOMAIN = 1, L_IP = 2, L_MD5 = 3, L_SHA1 = 4, L_SHA256 = 5, L_HASH = 6 };
enum { M_FINDALL = 0, M_SEARCH = 1, M_GENERIC = 2 };
enum { MISS = 0, MAYBE = 1, FAILED = -1, REFER = 2 /* the reference path must decide the whole event */ };
#define MAX_STORES 4

typedef struct {
    pcre2_code *code;
    uint32_t groups;
    int mode, all, lookup, field, fallback;
} Step;

typedef struct {
    Step *steps;
    int nsteps; /* steps[0..nsteps) run in order; steps[nsteps..ntotal) are fallbacks */
    int ntotal;
    pcre2_code **ignore;
    int nignore;
    pcre2_code **replace;
    PyObject **replace_out; /* bytes: the literal output of each replace rule */
    int nreplace;
    int reference; /* this source always runs on the reference path */
    PyObject *source_id; /* bytes */
} Plan;

typedef struct {
    Py_buffer keys, bloom, c4s, c4e, c6s, c6e;
    uint64_t bloom_mask;
    uint32_t kinds;
    Py_ssize_t nkeys, n4, n6;
    PyObject *global_masks; /* tuple of bytes: each star-host mask, UTF-8 */
    /* for candidates (store.py's lookups, in its order) */
    int slot, store;
    Py_buffer refs, c4off, c4refs, c4plen, c6off, c6refs, c6plen, grows;
    Py_ssize_t ngrows, nrecords;
    /* records: read with pread from the snapshot file (fd >= 0), never through its mapping (the kernel maps
     * 64 KiB around every page touched), or copied from `whole` for a snapshot built in memory */
    Py_buffer rkind, rflags, whole;
    int fd;
    uint64_t off_at[3], blob_at[3], blob_len[3]; /* columns: value, raw, context */
    PyObject *owner;                             /* the FeedIndex: keeps fd open while we read it */
    PyObject *category, *confidence; /* bytes */
    int supplier;                    /* 0 feed, 1 FalsePositive, 2 InternalTI */
    PyObject *actionable;            /* tuple of bytes: the feed's actionable field names */
} Index;

typedef struct { size_t start, end; } Span;
typedef struct { const char *p; size_t n; } Str;
typedef struct { Span *v; int n, cap; } Spans;

typedef struct {
    PyObject_HEAD
    Plan *plans;
    int nplans;
    int nfields;
    Span *fields;
    pcre2_code *host_re;
    PyObject *by_host;
    pcre2_code *fast_url, *fast_domain;
    PyObject *norm_url, *norm_domain, *norm_ip, *parse_ip;
    PyObject *template; /* tuple of bytes literals and int fields (>= 0 rule field, -1 SourceId, -2 Date) */
    Index *idx;
    int nidx;
    uint32_t kinds;
    int has_c4, has_c6, has_global;
    int nstores;
    uint32_t store_kinds[MAX_STORES];
    int store_global[MAX_STORES];
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    char *scratch;
    size_t scratch_cap;
    char *line;
    size_t line_cap;
    Spans values;
    PyObject *found; /* per event: list of (step number, raw value, candidates) for the reference _detect */
    /* detection lines in C (None of these: the Python detect callback renders them) */
    PyObject *event_tmpl, *record_fmt, *action_fmt, *finished_dyn; /* tuples of bytes literals and int codes */
    int needs_context;                             /* the finished line carries RecordContext / Date */
    Py_ssize_t limit;                              /* per_scan_detect_limit */
    char *ctxbuf, *actbuf, *totbuf;
    size_t ctxcap, actcap, totcap;
    char *colbuf[3]; /* the record strings last read, per column */
    size_t colcap[3];
    PyObject *per_category; /* dict category str -> count, this batch */
    PyObject *per_hit;      /* list of (slot, matched indicator str), one per detection line, this batch */
    Py_ssize_t detections, suppressed, confirmed;
    Py_ssize_t reference_events, detect_events;
    char *rbuf[2]; /* replace results, alternating */
    size_t rcap[2];
    const char *cur; /* the text being matched: the event, or a replace result */
    size_t cur_len;
} Engine;

/* ---- small helpers ----------------------------------------------------------------------------------- */

static int grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t cap2 = *cap ? *cap : 256;
    while (cap2 < need) cap2 *= 2;
    char *p = PyMem_Realloc(*buf, cap2);
    if (p == NULL) { PyErr_NoMemory(); return -1; }
    *buf = p;
    *cap = cap2;
    return 0;
}

static int spans_push(Spans *s, size_t a, size_t b) {
    if (s->n == s->cap) {
        int cap = s->cap ? s->cap * 2 : 16;
        Span *v = PyMem_Realloc(s->v, sizeof(Span) * (size_t)cap);
        if (v == NULL) { PyErr_NoMemory(); return -1; }
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n].start = a;
    s->v[s->n].end = b;
    s->n++;
    return 0;
}

static inline int py_space(unsigned char c) { return (c >= 9 && c <= 13) || (c >= 28 && c <= 32); }
static inline unsigned char lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c; }
static inline int is_hex(unsigned char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

/* ---- regexes ----------------------------------------------------------------------------------------- */

static pcre2_code *compile_re(PyObject *text, uint32_t options) {
    Py_ssize_t len;
    const char *src = PyUnicode_AsUTF8AndSize(text, &len);
    if (src == NULL) return NULL;
    int err;
    PCRE2_SIZE off;
    pcre2_compile_context *cctx = pcre2_compile_context_create(NULL);
    if (cctx == NULL) { PyErr_NoMemory(); return NULL; }
    pcre2_set_newline(cctx, PCRE2_NEWLINE_LF);
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)src, (PCRE2_SIZE)len, options | PCRE2_ALT_CIRCUMFLEX, &err, &off, cctx);
    pcre2_compile_context_free(cctx);
    if (code == NULL) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        PyErr_Format(PyExc_ValueError, "PCRE2 cannot compile it (offset %zu): %s", (size_t)off, (char *)msg);
        return NULL;
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE); /* without JIT it still matches, only slower */
    return code;
}

static uint32_t capture_count(pcre2_code *code) {
    uint32_t n = 0;
    pcre2_pattern_info(code, PCRE2_INFO_CAPTURECOUNT, &n);
    return n;
}

static inline int re_match(Engine *e, pcre2_code *code, const char *s, size_t len, size_t start, uint32_t opts) {
    return pcre2_match(code, (PCRE2_SPTR)s, len, start, opts, e->md, e->mctx);
}

/* The value one match gives for a step (a == b: none). */
static void step_value(const Step *st, const PCRE2_SIZE *ov, int rc, size_t *a, size_t *b) {
    *a = *b = 0;
    if (st->mode == M_GENERIC) {
        for (uint32_t g = 1; g <= st->groups && (int)g < rc; g++) {
            if (ov[2 * g] != PCRE2_UNSET && ov[2 * g + 1] > ov[2 * g]) {
                *a = ov[2 * g];
                *b = ov[2 * g + 1];
                return;
            }
        }
        return;
    }
    uint32_t g = st->groups; /* 0 or 1 */
    if ((int)g >= rc || ov[2 * g] == PCRE2_UNSET) return;
    *a = ov[2 * g];
    *b = ov[2 * g + 1];
}

/* A step's non-empty values, as matcher._run gives them.  0, or -1 on a regex error or limit (no exception). */
static int run_step(Engine *e, const Step *st, const char *s, size_t len, Spans *out) {
    out->n = 0;
    size_t pos = 0;
    uint32_t opts = 0;
    for (;;) {
        int rc = re_match(e, st->code, s, len, pos, opts);
        if (rc == PCRE2_ERROR_NOMATCH) return 0;
        if (rc <= 0) return -1;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t a, b;
        step_value(st, ov, rc, &a, &b);
        if (b > a && spans_push(out, a, b) < 0) return -2;
        if (!st->all) return 0;
        if (ov[1] < ov[0]) return -1; /* \K games: not produced by pcre.py, refuse anyway */
        opts = ov[1] == ov[0] ? PCRE2_NOTEMPTY_ATSTART : 0;
        pos = ov[1];
        if (pos > len) return 0;
    }
}

/* ---- the store prefilter ----------------------------------------------------------------------------- */

static inline int bloom_has(const Index *ix, uint64_t k) {
    const unsigned char *bits = ix->bloom.buf;
    uint64_t i = k & ix->bloom_mask;
    if (!((bits[i >> 3] >> (i & 7)) & 1)) return 0;
    i = (k >> 32) & ix->bloom_mask;
    return (bits[i >> 3] >> (i & 7)) & 1;
}

static inline int keys_have(const Index *ix, uint64_t k) {
    const uint64_t *keys = ix->keys.buf;
    Py_ssize_t lo = 0, hi = ix->nkeys;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < k) lo = mid + 1;
        else hi = mid;
    }
    return lo < ix->nkeys && keys[lo] == k;
}

static int has_key(Engine *e, int kind, const char *p, size_t n) {
    uint32_t bit = 1u << kind;
    if (!(e->kinds & bit)) return 0;
    uint64_t k = XXH3_64bits_withSeed(p, n, (XXH64_hash_t)kind);
    for (int i = 0; i < e->nidx; i++) {
        const Index *ix = &e->idx[i];
        if ((ix->kinds & bit) && ix->nkeys && bloom_has(ix, k) && keys_have(ix, k)) return 1;
    }
    return 0;
}

static int in_c4(Engine *e, uint32_t a) {
    for (int i = 0; i < e->nidx; i++) {
        const Index *ix = &e->idx[i];
        const uint32_t *st = ix->c4s.buf, *en = ix->c4e.buf;
        Py_ssize_t lo = 0, hi = ix->n4; /* first start > a */
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (st[mid] <= a) lo = mid + 1;
            else hi = mid;
        }
        if (lo > 0 && a <= en[lo - 1]) return 1;
    }
    return 0;
}

static inline int le128(uint64_t ah, uint64_t al, uint64_t bh, uint64_t bl) { return ah < bh || (ah == bh && al <= bl); }

static int in_c6(Engine *e, uint64_t h, uint64_t l) {
    for (int i = 0; i < e->nidx; i++) {
        const Index *ix = &e->idx[i];
        const uint64_t *st = ix->c6s.buf, *en = ix->c6e.buf;
        Py_ssize_t lo = 0, hi = ix->n6;
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (le128(st[2 * mid], st[2 * mid + 1], h, l)) lo = mid + 1;
            else hi = mid;
        }
        if (lo > 0 && le128(h, l, en[2 * (lo - 1)], en[2 * (lo - 1) + 1])) return 1;
    }
    return 0;
}

/* feeds.Mask.matches with the parts given as one string split at its stars. */
static int glob_text(const char *pat, size_t pl, const char *t, size_t n) {
    const char *star = memchr(pat, '*', pl);
    size_t fl = star ? (size_t)(star - pat) : pl;
    if (n < fl || memcmp(t, pat, fl) != 0) return 0;
    if (star == NULL) return n == fl;
    size_t pos = fl;
    const char *rest = star + 1;
    size_t rl = pl - fl - 1;
    for (;;) {
        const char *next = memchr(rest, '*', rl);
        if (next == NULL) break; /* rest is the tail */
        size_t partl = (size_t)(next - rest);
        const char *found = partl ? memmem(t + pos, n - pos, rest, partl) : t + pos;
        if (found == NULL) return 0;
        pos = (size_t)(found - t) + partl;
        rl -= partl + 1;
        rest = next + 1;
    }
    return n - pos >= rl && memcmp(t + n - rl, rest, rl) == 0;
}

/* 1-3 decimal digits, value <= 255 (normalize._OCTET), four of them: the address, or -1. */
static int64_t parse_v4(const char *p, size_t n) {
    uint32_t addr = 0;
    int parts = 0;
    size_t i = 0;
    while (parts < 4) {
        size_t start = i;
        unsigned v = 0;
        while (i < n && p[i] >= '0' && p[i] <= '9' && i - start < 4) v = v * 10 + (unsigned)(p[i++] - '0');
        size_t len = i - start;
        if (len == 0 || len > 3 || v > 255) return -1;
        addr = (addr << 8) | v;
        parts++;
        if (parts < 4) {
            if (i >= n || p[i] != '.') return -1;
            i++;
        }
    }
    return i == n ? (int64_t)addr : -1;
}

/* Canonical dotted quad (normalize._CANONICAL_OCTETS): no zero padding. */
static int canonical_v4(const char *p, size_t n) {
    if (parse_v4(p, n) < 0) return 0;
    size_t i = 0;
    while (i < n) {
        size_t start = i;
        while (i < n && p[i] != '.') i++;
        if (i - start > 1 && p[start] == '0') return 0;
        i++;
    }
    return 1;
}

static PyObject *ascii_str(const char *p, size_t n) {
    PyObject *s = PyUnicode_New((Py_ssize_t)n, 127);
    if (s != NULL) memcpy(PyUnicode_DATA(s), p, n);
    return s;
}

/* Bytes of a str returned by a normaliser: *owner holds them (a new reference to decref). */
static int str_bytes(PyObject *s, const char **p, size_t *n, PyObject **owner) {
    if (PyUnicode_IS_ASCII(s)) {
        *p = PyUnicode_DATA(s);
        *n = (size_t)PyUnicode_GET_LENGTH(s);
        Py_INCREF(s);
        *owner = s;
        return 0;
    }
    PyObject *b = PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
    if (b == NULL) return -1;
    *p = PyBytes_AS_STRING(b);
    *n = (size_t)PyBytes_GET_SIZE(b);
    *owner = b;
    return 0;
}

/* Call a normaliser on the raw value; MISS when it says None, FAILED on error, else fills p/n/owner. */
static int call_norm(PyObject *fn, const char *raw, size_t rn, const char **p, size_t *n, PyObject **owner) {
    PyObject *arg = ascii_str(raw, rn);
    if (arg == NULL) return FAILED;
    PyObject *r = PyObject_CallOneArg(fn, arg);
    Py_DECREF(arg);
    if (r == NULL) return FAILED;
    if (r == Py_None) { Py_DECREF(r); return MISS; }
    int rc = PyUnicode_Check(r) ? str_bytes(r, p, n, owner) : (PyErr_SetString(PyExc_TypeError, "normaliser"), -1);
    Py_DECREF(r);
    return rc < 0 ? FAILED : MAYBE;
}

static int probe_domain(Engine *e, const char *p, size_t n) {
    if (has_key(e, K_DOMAIN, p, n)) return MAYBE;
    if (!(e->kinds & (1u << K_DOMAIN_SUFFIX))) return MISS;
    for (;;) {
        if (has_key(e, K_DOMAIN_SUFFIX, p, n)) return MAYBE;
        const char *dot = memchr(p, '.', n);
        if (dot == NULL) return MISS;
        n -= (size_t)(dot + 1 - p);
        p = dot + 1;
    }
}

/* normalize.parse_ip: 1 and (version, hi, lo) for an address, 0 for none, -1 on error.  The dotted quad is
 * read here; anything else (IPv6, surrounding whitespace) by the reference parser itself. */
static int ip_number(Engine *e, const char *p, size_t n, int *version, uint64_t *hi, uint64_t *lo) {
    int64_t v4 = parse_v4(p, n);
    if (v4 >= 0) {
        *version = 4;
        *hi = 0;
        *lo = (uint64_t)v4;
        return 1;
    }
    int odd = memchr(p, ':', n) != NULL;
    for (size_t i = 0; i < n && !odd; i++) odd = py_space((unsigned char)p[i]) || (unsigned char)p[i] >= 128;
    if (!odd) return 0;
    PyObject *arg = PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "surrogatepass");
    if (arg == NULL) return -1;
    PyObject *r = PyObject_CallOneArg(e->parse_ip, arg);
    Py_DECREF(arg);
    if (r == NULL) return -1;
    if (r == Py_None) { Py_DECREF(r); return 0; }
    *version = (int)PyLong_AsLong(PyTuple_GET_ITEM(r, 0));
    PyObject *num = PyTuple_GET_ITEM(r, 1);
    *lo = PyLong_AsUnsignedLongLongMask(num);
    *hi = 0;
    if (*version == 6) {
        PyObject *sixty_four = PyLong_FromLong(64);
        PyObject *hi_obj = sixty_four ? PyNumber_Rshift(num, sixty_four) : NULL;
        Py_XDECREF(sixty_four);
        if (hi_obj == NULL) { Py_DECREF(r); return -1; }
        *hi = PyLong_AsUnsignedLongLongMask(hi_obj);
        Py_DECREF(hi_obj);
    }
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : 1;
}

/* An IP value as the store takes it (already normalised): exact key and CIDR intervals. */
static int probe_ip(Engine *e, const char *p, size_t n) {
    if (has_key(e, K_IP, p, n)) return MAYBE;
    if (!e->has_c4 && !e->has_c6) return MISS;
    int version;
    uint64_t hi, lo;
    int rc = ip_number(e, p, n, &version, &hi, &lo);
    if (rc <= 0) return rc < 0 ? FAILED : MISS;
    if (version == 4) return e->has_c4 && in_c4(e, (uint32_t)lo) ? MAYBE : MISS;
    return e->has_c6 && in_c6(e, hi, lo) ? MAYBE : MISS;
}

static int probe_url(Engine *e, const char *p, size_t n) {
    if (has_key(e, K_URL, p, n)) return MAYBE;
    size_t hn = 0;
    while (hn < n && p[hn] != '/' && p[hn] != '?') hn++;
    if (hn == 0) return MISS;
    if (e->kinds & (1u << K_MASK)) {
        const char *s = p;
        size_t sn = hn;
        for (;;) {
            if (has_key(e, K_MASK, s, sn)) return MAYBE;
            const char *dot = memchr(s, '.', sn);
            if (dot == NULL) break;
            sn -= (size_t)(dot + 1 - s);
            s = dot + 1;
        }
    }
    if (e->has_global) {
        for (int i = 0; i < e->nidx; i++) {
            PyObject *masks = e->idx[i].global_masks;
            for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(masks); j++) {
                PyObject *m = PyTuple_GET_ITEM(masks, j);
                if (glob_text(PyBytes_AS_STRING(m), (size_t)PyBytes_GET_SIZE(m), p, n)) return MAYBE;
            }
        }
    }
    unsigned char last = (unsigned char)p[hn - 1];
    if ((last >= '0' && last <= '9') || p[0] == '[') {
        const char *h = p;
        size_t m = hn;
        while (m && (*h == '[' || *h == ']')) { h++; m--; }
        while (m && (h[m - 1] == '[' || h[m - 1] == ']')) m--;
        return probe_ip(e, h, m);
    }
    return probe_domain(e, p, hn);
}

/* Normalise one raw value of a lookup rule and probe it: MISS, MAYBE or FAILED (exception set). */
/* The normalised value of a lookup rule's raw value, as matcher._lookup_* computes it: MAYBE with p/n (and
 * *owner to release, maybe NULL), MISS when it is not a value of that type, REFER on a regex limit, FAILED. */
static int normalise(Engine *e, int lookup, const char *raw, size_t rn, const char **p, size_t *n, PyObject **owner) {
    *owner = NULL;
    if (lookup >= L_MD5) {
        size_t a = 0, b = rn;
        while (a < b && py_space((unsigned char)raw[a])) a++;
        while (b > a && py_space((unsigned char)raw[b - 1])) b--;
        size_t m = b - a;
        if (m != 32 && m != 40 && m != 64) return MISS;
        if ((lookup == L_MD5 && m != 32) || (lookup == L_SHA1 && m != 40) || (lookup == L_SHA256 && m != 64)) return MISS;
        if (grow(&e->scratch, &e->scratch_cap, m) < 0) return FAILED;
        for (size_t i = 0; i < m; i++) {
            unsigned char c = lower((unsigned char)raw[a + i]);
            if (!is_hex(c)) return MISS;
            e->scratch[i] = (char)c;
        }
        *p = e->scratch;
        *n = m;
        return MAYBE;
    }
    if (lookup == L_IP) {
        if (canonical_v4(raw, rn)) {
            *p = raw;
            *n = rn;
            return MAYBE;
        }
        return call_norm(e->norm_ip, raw, rn, p, n, owner);
    }
    if (grow(&e->scratch, &e->scratch_cap, rn + 1) < 0) return FAILED;
    for (size_t i = 0; i < rn; i++) e->scratch[i] = (char)lower((unsigned char)raw[i]);
    pcre2_code *fast = lookup == L_URL ? e->fast_url : e->fast_domain;
    int m = re_match(e, fast, e->scratch, rn, 0, 0); /* compiled anchored at both ends: JIT runs it */
    if (m > 0) {
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t g = lookup == L_URL ? 1 : 0;
        if (lookup == L_URL && (m < 2 || ov[2] == PCRE2_UNSET)) return REFER; /* cannot happen; be safe */
        *p = e->scratch + ov[2 * g];
        *n = ov[2 * g + 1] - ov[2 * g];
        return MAYBE;
    }
    if (m != PCRE2_ERROR_NOMATCH) return REFER;
    return call_norm(lookup == L_URL ? e->norm_url : e->norm_domain, raw, rn, p, n, owner);
}

/* The prefilter for one raw value: MISS (certainly no candidate), MAYBE, REFER or FAILED. */
static int check_value(Engine *e, int lookup, const char *raw, size_t rn) {
    const char *p = NULL;
    size_t n = 0;
    PyObject *owner = NULL;
    int rc = normalise(e, lookup, raw, rn, &p, &n, &owner);
    if (rc != MAYBE) return rc;
    if (lookup >= L_MD5) rc = has_key(e, K_HASH, p, n) ? MAYBE : MISS;
    else if (lookup == L_IP) rc = probe_ip(e, p, n);
    else if (lookup == L_URL) rc = probe_url(e, p, n);
    else rc = probe_domain(e, p, n);
    Py_XDECREF(owner);
    return rc;
}

/* ---- candidates, exactly as store.IndicatorStore's lookups list them ------------------------------------- */

static int cand_add(PyObject *out, int slot, uint32_t row, int kind, const char *p, size_t n) {
    PyObject *probe = PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "surrogatepass");
    if (probe == NULL) return -1;
    PyObject *t = Py_BuildValue("(iIiN)", slot, (unsigned int)row, kind, probe);
    if (t == NULL) return -1;
    int rc = PyList_Append(out, t);
    Py_DECREF(t);
    return rc;
}

/* First position of key k in the sorted keys (nkeys when absent). */
static Py_ssize_t key_pos(const Index *ix, uint64_t k) {
    const uint64_t *keys = ix->keys.buf;
    Py_ssize_t lo = 0, hi = ix->nkeys;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < k) lo = mid + 1;
        else hi = mid;
    }
    return lo < ix->nkeys && keys[lo] == k ? lo : ix->nkeys;
}

/* store._probe: every feed of the store, in slot order, the rows under the key in key-array order. */
static int c_probe(Engine *e, int store, int kind, const char *p, size_t n, PyObject *out) {
    uint64_t k = XXH3_64bits_withSeed(p, n, (XXH64_hash_t)kind);
    for (int i = 0; i < e->nidx; i++) {
        const Index *ix = &e->idx[i];
        if (ix->store != store || !ix->nkeys || !bloom_has(ix, k)) continue;
        const uint64_t *keys = ix->keys.buf;
        const uint32_t *refs = ix->refs.buf;
        for (Py_ssize_t j = key_pos(ix, k); j < ix->nkeys && keys[j] == k; j++)
            if (cand_add(out, ix->slot, refs[j], kind, p, n) < 0) return -1;
    }
    return 0;
}

static inline int store_has(Engine *e, int store, int kind) { return (e->store_kinds[store] >> kind) & 1; }

static int c_domain(Engine *e, int store, const char *p, size_t n, PyObject *out) {
    if (store_has(e, store, K_DOMAIN) && c_probe(e, store, K_DOMAIN, p, n, out) < 0) return -1;
    if (!store_has(e, store, K_DOMAIN_SUFFIX)) return 0;
    for (;;) {
        if (c_probe(e, store, K_DOMAIN_SUFFIX, p, n, out) < 0) return -1;
        const char *dot = memchr(p, '.', n);
        if (dot == NULL) return 0;
        n -= (size_t)(dot + 1 - p);
        p = dot + 1;
    }
}

typedef struct { int plen, slot; uint32_t row; } CidrHit;

static int cidr_cmp(const void *a, const void *b) {
    const CidrHit *x = a, *y = b;
    if (x->plen != y->plen) return y->plen - x->plen; /* most specific first */
    if (x->slot != y->slot) return x->slot - y->slot;
    return x->row < y->row ? -1 : x->row > y->row;
}

static int c_ip(Engine *e, int store, const char *p, size_t n, PyObject *out) {
    if (store_has(e, store, K_IP) && c_probe(e, store, K_IP, p, n, out) < 0) return -1;
    int six = memchr(p, ':', n) != NULL, feeds = 0;
    for (int i = 0; i < e->nidx; i++)
        if (e->idx[i].store == store && (six ? e->idx[i].n6 : e->idx[i].n4) > 0) feeds++;
    if (!feeds) return 0;
    int version;
    uint64_t hi, lo;
    int rc = ip_number(e, p, n, &version, &hi, &lo);
    if (rc <= 0) return rc;
    CidrHit *hits = NULL;
    size_t nh = 0, cap = 0;
    for (int i = 0; i < e->nidx; i++) {
        const Index *ix = &e->idx[i];
        if (ix->store != store || (six ? ix->n6 : ix->n4) == 0) continue;
        Py_ssize_t seg;
        if (version == 4) {
            const uint32_t *st = ix->c4s.buf, *en = ix->c4e.buf;
            Py_ssize_t a = 0, b = ix->n4;
            while (a < b) { Py_ssize_t m = a + (b - a) / 2; if (st[m] <= lo) a = m + 1; else b = m; }
            if (a == 0 || lo > en[a - 1]) continue;
            seg = a - 1;
        } else {
            const uint64_t *st = ix->c6s.buf, *en = ix->c6e.buf;
            Py_ssize_t a = 0, b = ix->n6;
            while (a < b) { Py_ssize_t m = a + (b - a) / 2; if (le128(st[2 * m], st[2 * m + 1], hi, lo)) a = m + 1; else b = m; }
            if (a == 0 || !le128(hi, lo, en[2 * (a - 1)], en[2 * (a - 1) + 1])) continue;
            seg = a - 1;
        }
        const uint32_t *off = version == 4 ? ix->c4off.buf : ix->c6off.buf;
        const uint32_t *refs = version == 4 ? ix->c4refs.buf : ix->c6refs.buf;
        const uint8_t *plens = version == 4 ? ix->c4plen.buf : ix->c6plen.buf;
        for (uint32_t j = off[seg]; j < off[seg + 1]; j++) {
            if (nh == cap) {
                cap = cap ? cap * 2 : 16;
                CidrHit *h2 = PyMem_Realloc(hits, cap * sizeof(CidrHit));
                if (h2 == NULL) { PyMem_Free(hits); PyErr_NoMemory(); return -1; }
                hits = h2;
            }
            hits[nh].plen = plens[j];
            hits[nh].slot = ix->slot;
            hits[nh].row = refs[j];
            nh++;
        }
    }
    if (feeds > 1 && nh > 1) qsort(hits, nh, sizeof(CidrHit), cidr_cmp);
    for (size_t j = 0; j < nh; j++)
        if (cand_add(out, hits[j].slot, hits[j].row, K_CIDR, p, n) < 0) { PyMem_Free(hits); return -1; }
    PyMem_Free(hits);
    return 0;
}


enum { C_VALUE = 0, C_RAW = 1, C_CTX = 2 };

static int read_at(const Index *ix, uint64_t at, void *dst, size_t n) {
    if (ix->fd < 0) {
        if (at > (uint64_t)ix->whole.len || n > (uint64_t)ix->whole.len - at) return -1;
        memcpy(dst, (const char *)ix->whole.buf + at, n);
        return 0;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(ix->fd, (char *)dst + done, n - done, (off_t)(at + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        done += (size_t)r;
    }
    return 0;
}

/* Record `row`'s string of column `col` (FeedIndex._string): 0 with *out in e->colbuf[col], -1 when it
 * cannot be read (the caller hands the event to the Python code, which reports the failure). */
static int read_item(Engine *e, const Index *ix, int col, uint32_t row, Str *out) {
    uint64_t span[2];
    if (row >= (uint64_t)ix->nrecords || read_at(ix, ix->off_at[col] + 8 * (uint64_t)row, span, sizeof span) < 0)
        return -1;
    if (span[0] > span[1] || span[1] > ix->blob_len[col]) return -1;
    out->p = e->colbuf[col];
    out->n = 0;
    if (span[0] == span[1]) return 0; /* an empty context takes no bytes */
    size_t n = (size_t)(span[1] - span[0] - 1);
    if (grow(&e->colbuf[col], &e->colcap[col], n + 1) < 0) { PyErr_Clear(); return -1; }
    if (read_at(ix, ix->blob_at[col] + span[0], e->colbuf[col], n) < 0) return -1;
    out->p = e->colbuf[col];
    out->n = n;
    return 0;
}

static int c_masks(Engine *e, int store, const char *host, size_t hn, const char *url, size_t un, PyObject *out) {
    const char *rest = url + hn;
    size_t rl = un - hn;
    if (rl == 0) { rest = "/"; rl = 1; }
    if (store_has(e, store, K_MASK)) {
        const char *s = host;
        size_t sn = hn;
        for (int first = 1;; first = 0) {
            uint64_t k = XXH3_64bits_withSeed(s, sn, (XXH64_hash_t)K_MASK);
            for (int i = 0; i < e->nidx; i++) {
                const Index *ix = &e->idx[i];
                if (ix->store != store || !ix->nkeys || !bloom_has(ix, k)) continue;
                const uint64_t *keys = ix->keys.buf;
                const uint32_t *refs = ix->refs.buf;
                for (Py_ssize_t j = key_pos(ix, k); j < ix->nkeys && keys[j] == k; j++) {
                    uint32_t row = refs[j];
                    Str sv;
                    if (read_item(e, ix, C_VALUE, row, &sv) < 0) return REFER;
                    const char *v = sv.p;
                    size_t vn = sv.n;
                    size_t mh = 0;
                    while (mh < vn && v[mh] != '/' && v[mh] != '?') mh++;
                    int subdomains = mh >= 2 && v[0] == '*' && v[1] == '.';
                    const char *mrest = v + mh;
                    size_t mrl = vn - mh;
                    if (mrl == 0) { mrest = "/"; mrl = 1; }
                    if ((subdomains || first) && glob_text(mrest, mrl, rest, rl))
                        if (cand_add(out, ix->slot, row, K_MASK, url, un) < 0) return -1;
                }
            }
            const char *dot = memchr(s, '.', sn);
            if (dot == NULL) break;
            sn -= (size_t)(dot + 1 - s);
            s = dot + 1;
        }
    }
    for (int i = 0; i < e->nidx; i++) {
        const Index *ix = &e->idx[i];
        if (ix->store != store) continue;
        const uint32_t *rows = ix->grows.buf;
        for (Py_ssize_t j = 0; j < ix->ngrows; j++) {
            Str sv;
            if (read_item(e, ix, C_VALUE, rows[j], &sv) < 0) return REFER;
            const char *v = sv.p;
            size_t vn = sv.n;
            if (glob_text(v, vn, url, un) && cand_add(out, ix->slot, rows[j], K_MASK, url, un) < 0) return -1;
        }
    }
    return 0;
}

static int c_url(Engine *e, int store, const char *p, size_t n, PyObject *out) {
    if (store_has(e, store, K_URL) && c_probe(e, store, K_URL, p, n, out) < 0) return -1;
    size_t hn = 0;
    while (hn < n && p[hn] != '/' && p[hn] != '?') hn++;
    if (hn == 0) return 0;
    if (store_has(e, store, K_MASK) || e->store_global[store]) {
        int r = c_masks(e, store, p, hn, p, n, out);
        if (r != 0) return r; /* -1 error, REFER a mask record that cannot be read */
    }
    unsigned char last = (unsigned char)p[hn - 1];
    if ((last >= '0' && last <= '9') || p[0] == '[') {
        const char *h = p;
        size_t m = hn;
        while (m && (*h == '[' || *h == ']')) { h++; m--; }
        while (m && (h[m - 1] == '[' || h[m - 1] == ']')) m--;
        return c_ip(e, store, h, m, out);
    }
    return c_domain(e, store, p, hn, out);
}

/* The candidates of one raw value, feed store first, then the supplier store (Matcher._lookup_*): a new list,
 * Py_None when the value is not of its type (no lookup at all), NULL with REFER in *refer, or NULL on error. */
static PyObject *candidates(Engine *e, int lookup, const char *raw, size_t rn, int *refer) {
    *refer = 0;
    const char *p = NULL;
    size_t n = 0;
    PyObject *owner = NULL;
    int rc = normalise(e, lookup, raw, rn, &p, &n, &owner);
    if (rc == FAILED) return NULL;
    if (rc == REFER) { *refer = 1; return NULL; }
    if (rc == MISS) Py_RETURN_NONE;
    for (size_t i = 0; i < n; i++) {
        if ((unsigned char)p[i] >= 128) { /* a non-ASCII value: the reference code tests its characters */
            Py_XDECREF(owner);
            *refer = 1;
            return NULL;
        }
    }
    PyObject *out = PyList_New(0);
    for (int store = 0; out != NULL && store < e->nstores; store++) {
        int r;
        if (lookup >= L_MD5) r = store_has(e, store, K_HASH) ? c_probe(e, store, K_HASH, p, n, out) : 0;
        else if (lookup == L_IP) r = c_ip(e, store, p, n, out);
        else if (lookup == L_URL) r = c_url(e, store, p, n, out);
        else r = c_domain(e, store, p, n, out);
        if (r == REFER) *refer = 1;
        if (r != 0) Py_CLEAR(out);
    }
    Py_XDECREF(owner);
    return out;
}

/* ---- rendering ----------------------------------------------------------------------------------------- */

/* Field codes in templates (engine.py builds them): >= 0 a rule's first value; the rest below. */
enum {
    F_SOURCE = -1, F_DATE = -2, F_CATEGORY = -3, F_MATCHED = -4, F_CONFIDENCE = -5, F_CONTEXT = -6,
    F_CONTEXT_SPACED = -7, F_ACTIONABLE = -8, F_PARAM_NAME = -10, F_PARAM_VALUE = -11
};


typedef struct {
    const char *s;     /* the event text the rule fields point into */
    const Span *fields;
    int rule_field;    /* the detecting rule's field (its value replaces the first value), -1 none */
    Str rule_value, source, date, category, matched, confidence, context, actionable, pname, pvalue;
} Ctx;

static Str field_of(Engine *e, const Ctx *c, long f) {
    Str out = {NULL, 0};
    if (f >= 0) {
        if (f == c->rule_field) return c->rule_value;
        if (c->fields && f < e->nfields && c->fields[f].end > c->fields[f].start) {
            out.p = c->s + c->fields[f].start;
            out.n = c->fields[f].end - c->fields[f].start;
        }
        return out;
    }
    switch (f) {
    case F_SOURCE: return c->source;
    case F_DATE: return c->date;
    case F_CATEGORY: return c->category;
    case F_MATCHED: return c->matched;
    case F_CONFIDENCE: return c->confidence;
    case F_CONTEXT: return c->context;
    case F_ACTIONABLE: return c->actionable;
    case F_PARAM_NAME: return c->pname;
    case F_PARAM_VALUE: return c->pvalue;
    default: return out;
    }
}

/* Append the rendering of `pieces` to buf[*len..]; clears *ascii when a byte >= 128 goes in. */
static int render_into(Engine *e, PyObject *pieces, const Ctx *c, char **buf, size_t *cap, size_t *len, int *ascii) {
    Py_ssize_t n = PyTuple_GET_SIZE(pieces);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *piece = PyTuple_GET_ITEM(pieces, i);
        Str v;
        int spaced = 0;
        if (PyBytes_CheckExact(piece)) {
            v.p = PyBytes_AS_STRING(piece);
            v.n = (size_t)PyBytes_GET_SIZE(piece);
        } else {
            long f = PyLong_AsLong(piece);
            if (f == F_CONTEXT_SPACED) {
                v = c->context;
                spaced = v.n > 0;
            } else {
                v = field_of(e, c, f);
            }
        }
        if (grow(buf, cap, *len + v.n + 2) < 0) return -1;
        if (spaced) (*buf)[(*len)++] = ' ';
        if (v.n) {
            memcpy(*buf + *len, v.p, v.n);
            for (size_t k = 0; k < v.n && *ascii; k++) *ascii = (unsigned char)v.p[k] < 128;
            *len += v.n;
        }
    }
    return 0;
}

static PyObject *line_str(const char *p, size_t n, int ascii) {
    return ascii ? ascii_str(p, n) : PyUnicode_DecodeUTF8(p, (Py_ssize_t)n, "surrogatepass");
}

/* The fields every line of an event shares: its rule values, its source, the batch's date. */
static Ctx event_ctx(Engine *e, const char *s, const Plan *plan, const char *date, size_t date_len) {
    Ctx c;
    memset(&c, 0, sizeof c);
    c.s = s;
    c.fields = e->fields;
    c.rule_field = -1;
    c.source.p = PyBytes_AS_STRING(plan->source_id);
    c.source.n = (size_t)PyBytes_GET_SIZE(plan->source_id);
    c.date.p = date;
    c.date.n = date_len;
    return c;
}

static PyObject *render_finished(Engine *e, const char *s, const Plan *plan, const char *date, size_t date_len) {
    Ctx c = event_ctx(e, s, plan, date, date_len);
    size_t len = 0;
    int ascii = 1;
    if (render_into(e, e->template, &c, &e->line, &e->line_cap, &len, &ascii) < 0) return NULL;
    if (grow(&e->line, &e->line_cap, len + 1) < 0) return NULL;
    e->line[len] = '\n';
    return line_str(e->line, len + 1, ascii);
}

/* ---- detections (Matcher._confirm and _detect_candidates, in C) ----------------------------------------- */

static const Index *index_of_slot(const Engine *e, long slot) {
    for (int i = 0; i < e->nidx; i++)
        if (e->idx[i].slot == slot) return &e->idx[i];
    return NULL;
}


static size_t host_len(const char *p, size_t n) {
    size_t h = 0;
    while (h < n && p[h] != '/' && p[h] != '?') h++;
    return h;
}

/* feeds.mask_matches(mask value, url). */
static int mask_covers(Str v, const char *url, size_t un) {
    size_t h = host_len(v.p, v.n);
    int sub = h >= 2 && v.p[0] == '*' && v.p[1] == '.';
    const char *key = sub ? v.p + 2 : v.p;
    size_t kl = sub ? h - 2 : h;
    if (memchr(key, '*', kl) != NULL) return glob_text(v.p, v.n, url, un);
    size_t uh = host_len(url, un);
    int same = uh == kl && memcmp(url, key, kl) == 0;
    int below = sub && uh > kl && url[uh - kl - 1] == '.' && memcmp(url + uh - kl, key, kl) == 0;
    if (!same && !below) return 0;
    const char *mrest = v.p + h, *rest = url + uh;
    size_t ml = v.n - h, rl = un - uh;
    if (!ml) { mrest = "/"; ml = 1; }
    if (!rl) { rest = "/"; rl = 1; }
    return glob_text(mrest, ml, rest, rl);
}

/* " ".join / "".join of FieldFormat renderings of a record's context pairs (only `wanted` names when given). */
static int render_pairs(Engine *e, Str ctx, PyObject *fmt, PyObject *wanted, const char *sep, char **buf, size_t *cap,
                        size_t *len, int *ascii) {
    *len = 0;
    size_t pos = 0;
    int first = 1;
    while (pos < ctx.n) {
        const char *name = ctx.p + pos;
        const char *z = memchr(name, 0, ctx.n - pos);
        if (z == NULL) return -2; /* damaged: let the reference say so */
        size_t nl = (size_t)(z - name);
        pos += nl + 1;
        const char *value = ctx.p + pos;
        const char *z2 = pos <= ctx.n ? memchr(value, 0, ctx.n - pos) : NULL;
        size_t vl = z2 ? (size_t)(z2 - value) : ctx.n - pos;
        pos += vl + 1;
        if (wanted != NULL) {
            int keep = 0;
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(wanted) && !keep; i++) {
                PyObject *w = PyTuple_GET_ITEM(wanted, i);
                keep = (size_t)PyBytes_GET_SIZE(w) == nl && memcmp(PyBytes_AS_STRING(w), name, nl) == 0;
            }
            if (!keep) continue;
        }
        if (!first && *sep) {
            if (grow(buf, cap, *len + 1) < 0) return -1;
            (*buf)[(*len)++] = *sep;
        }
        first = 0;
        Ctx c;
        memset(&c, 0, sizeof c);
        c.rule_field = -1;
        c.pname.p = name;
        c.pname.n = nl;
        c.pvalue.p = value;
        c.pvalue.n = vl;
        if (render_into(e, fmt, &c, buf, cap, len, ascii) < 0) return -1;
    }
    return 0;
}

static int count_category(Engine *e, PyObject *category, Py_ssize_t count) {
    PyObject *key = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(category), PyBytes_GET_SIZE(category), "surrogatepass");
    if (key == NULL) return -1;
    if (e->per_category == NULL && (e->per_category = PyDict_New()) == NULL) { Py_DECREF(key); return -1; }
    PyObject *old = PyDict_GetItemWithError(e->per_category, key);
    Py_ssize_t n = old ? PyLong_AsSsize_t(old) : 0;
    PyObject *v = PyLong_FromSsize_t(n + count);
    int rc = v ? PyDict_SetItem(e->per_category, key, v) : -1;
    Py_XDECREF(v);
    Py_DECREF(key);
    return rc;
}

typedef struct { const Index *ix; uint32_t row; } HitRef;
typedef struct { PyObject *category; Py_ssize_t count; } Total;
typedef struct { Str value; long slot; uint32_t row; } Done;

/* The event's detection lines and its finished line, as the reference's _detect_candidates and
 * _finished_line give them, into `out`: 1 done, 0 when a record cannot be read here (nothing added: the
 * Python code then answers the event and reports the failure), -1 error. */
static int detect_c(Engine *e, const Plan *plan, const char *s, PyObject *found, const char *date, size_t dl,
                    int finished, PyObject *out) {
    if (e->event_tmpl == NULL) return 0;
    PyObject *lines = PyList_New(0);
    if (lines == NULL) return -1;
    PyObject *hitkeys = PyList_New(0); /* (slot, matched indicator) per line: the node's statistics */
    if (hitkeys == NULL) { Py_DECREF(lines); return -1; }
    Py_ssize_t detections = 0, suppressed = 0;
    HitRef *hits = NULL;
    Done *done = NULL;
    Total *totals = NULL;
    int ntotals = 0, tcap = 0, ok = -1;
    size_t nhits = 0, hcap = 0, ndone = 0, dcap = 0;
    Py_ssize_t sent = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(found); i++) {
        PyObject *item = PyList_GET_ITEM(found, i);
        const Step *st = &plan->steps[PyLong_AsLong(PyTuple_GET_ITEM(item, 0))];
        PyObject *raw_obj = PyTuple_GET_ITEM(item, 1);
        Str raw = {PyUnicode_DATA(raw_obj), (size_t)PyUnicode_GET_LENGTH(raw_obj)};
        PyObject *cands = PyTuple_GET_ITEM(item, 2);
        /* _confirm */
        nhits = 0;
        int false_positive = 0;
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(cands); j++) {
            PyObject *cand = PyList_GET_ITEM(cands, j);
            const Index *ix = index_of_slot(e, PyLong_AsLong(PyTuple_GET_ITEM(cand, 0)));
            uint32_t row = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(cand, 1));
            int kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(cand, 2));
            PyObject *probe = PyTuple_GET_ITEM(cand, 3);
            int seen = 0;
            for (Py_ssize_t k = 0; k < j && !seen; k++) {
                PyObject *other = PyList_GET_ITEM(cands, k);
                seen = PyLong_AsLong(PyTuple_GET_ITEM(other, 0)) == PyLong_AsLong(PyTuple_GET_ITEM(cand, 0)) &&
                       PyLong_AsUnsignedLong(PyTuple_GET_ITEM(other, 1)) == row;
            }
            if (seen || ix == NULL) continue;
            if (row >= (uint32_t)ix->nrecords) { ok = 0; goto end; }
            if (((const int8_t *)ix->rkind.buf)[row] != kind) continue;
            Str value;
            if (read_item(e, ix, C_VALUE, row, &value) < 0) { ok = 0; goto end; }
            const char *pp = PyUnicode_DATA(probe);
            size_t pn = (size_t)PyUnicode_GET_LENGTH(probe);
            if (kind == K_MASK) {
                if (!mask_covers(value, pp, pn)) continue;
            } else if (kind != K_CIDR) { /* CIDR candidates come from the intervals: covered by construction */
                if (value.n != pn || memcmp(value.p, pp, pn) != 0) continue;
            }
            if (ix->supplier == 1) {
                false_positive = 1;
                continue;
            }
            if (nhits == hcap) {
                hcap = hcap ? hcap * 2 : 8;
                HitRef *h2 = PyMem_Realloc(hits, hcap * sizeof(HitRef));
                if (h2 == NULL) { PyErr_NoMemory(); goto end; }
                hits = h2;
            }
            hits[nhits].ix = ix;
            hits[nhits].row = row;
            nhits++;
        }
        if (false_positive) {
            size_t kept = 0;
            for (size_t k = 0; k < nhits; k++)
                if (hits[k].ix->supplier == 2) hits[kept++] = hits[k];
            suppressed += (Py_ssize_t)(nhits - kept);
            nhits = kept;
        }
        /* _detect_candidates */
        Py_ssize_t emitted = 0;
        for (size_t k = 0; k < nhits; k++) {
            const Index *ix = hits[k].ix;
            uint32_t row = hits[k].row;
            int dup = 0;
            for (size_t d = 0; d < ndone && !dup; d++)
                dup = done[d].slot == ix->slot && done[d].row == row && done[d].value.n == raw.n &&
                      memcmp(done[d].value.p, raw.p, raw.n) == 0;
            if (dup) continue;
            if (ndone == dcap) {
                dcap = dcap ? dcap * 2 : 8;
                Done *d2 = PyMem_Realloc(done, dcap * sizeof(Done));
                if (d2 == NULL) { PyErr_NoMemory(); goto end; }
                done = d2;
            }
            done[ndone].value = raw;
            done[ndone].slot = ix->slot;
            done[ndone].row = row;
            ndone++;
            if (e->limit && emitted >= e->limit) break;
            emitted++;
            if (((const uint8_t *)ix->rflags.buf)[row] & 2) { ok = 0; goto end; } /* context stored as JSON */
            Str ctx, matched;
            if (read_item(e, ix, C_CTX, row, &ctx) < 0 || read_item(e, ix, C_RAW, row, &matched) < 0) {
                ok = 0;
                goto end;
            }
            size_t zeros = 0;
            for (size_t z = 0; z < ctx.n; z++) zeros += ctx.p[z] == 0;
            if (ctx.n && zeros % 2 == 0) { ok = 0; goto end; } /* not name/value pairs: damaged */
            size_t clen = 0, alen = 0;
            int ascii = 1;
            int rc = render_pairs(e, ctx, e->record_fmt, NULL, " ", &e->ctxbuf, &e->ctxcap, &clen, &ascii);
            if (rc == 0 && PyTuple_GET_SIZE(ix->actionable))
                rc = render_pairs(e, ctx, e->action_fmt, ix->actionable, "", &e->actbuf, &e->actcap, &alen, &ascii);
            if (rc < 0) goto end;
            Ctx c = event_ctx(e, s, plan, date, dl);
            c.rule_field = st->field;
            c.rule_value = raw;
            c.category.p = PyBytes_AS_STRING(ix->category);
            c.category.n = (size_t)PyBytes_GET_SIZE(ix->category);
            c.matched = matched;
            c.confidence.p = PyBytes_AS_STRING(ix->confidence);
            c.confidence.n = (size_t)PyBytes_GET_SIZE(ix->confidence);
            c.context.p = e->ctxbuf;
            c.context.n = clen;
            c.actionable.p = e->actbuf;
            c.actionable.n = alen;
            size_t len = 0;
            if (render_into(e, e->event_tmpl, &c, &e->line, &e->line_cap, &len, &ascii) < 0) goto end;
            if (grow(&e->line, &e->line_cap, len + 1) < 0) goto end;
            e->line[len] = '\n';
            PyObject *line = line_str(e->line, len + 1, ascii);
            if (line == NULL) goto end;
            int err = PyList_Append(lines, line);
            Py_DECREF(line);
            if (err < 0) goto end;
            PyObject *hitkey = Py_BuildValue("(iN)", ix->slot,
                                             PyUnicode_DecodeUTF8(matched.p, (Py_ssize_t)matched.n, "surrogatepass"));
            if (hitkey == NULL) goto end;
            err = PyList_Append(hitkeys, hitkey);
            Py_DECREF(hitkey);
            if (err < 0) goto end;
            int t = 0;
            while (t < ntotals && PyObject_RichCompareBool(totals[t].category, ix->category, Py_EQ) != 1) t++;
            if (t == ntotals) {
                if (ntotals == tcap) {
                    tcap = tcap ? tcap * 2 : 8;
                    Total *t2 = PyMem_Realloc(totals, (size_t)tcap * sizeof(Total));
                    if (t2 == NULL) { PyErr_NoMemory(); goto end; }
                    totals = t2;
                }
                totals[t].category = ix->category;
                totals[t].count = 0;
                ntotals++;
            }
            totals[t].count++;
            detections++;
            sent++;
        }
    }
    if (finished && e->template != NULL) {
        PyObject *line;
        if (!e->needs_context) {
            line = render_finished(e, s, plan, date, dl);
        } else {
            size_t tl = 0;
            for (int t = 0; t < ntotals; t++) {
                char num[32];
                int nl = snprintf(num, sizeof num, ":%zd;", totals[t].count);
                size_t cl = (size_t)PyBytes_GET_SIZE(totals[t].category);
                if (grow(&e->totbuf, &e->totcap, tl + cl + (size_t)nl + 1) < 0) goto end;
                memcpy(e->totbuf + tl, PyBytes_AS_STRING(totals[t].category), cl);
                memcpy(e->totbuf + tl + cl, num, (size_t)nl);
                tl += cl + (size_t)nl;
            }
            char sent_text[32];
            int sl = snprintf(sent_text, sizeof sent_text, "%zd", sent);
            Str names[3] = {{"event_type", 10}, {"sent_events", 11}, {"total", 5}};
            Str values[3] = {{"LookupFinished", 14}, {sent_text, (size_t)sl}, {e->totbuf, tl}};
            size_t clen = 0;
            int ascii = 1;
            for (int k = 0; k < 3; k++) {
                if (k && grow(&e->ctxbuf, &e->ctxcap, clen + 1) == 0) e->ctxbuf[clen++] = ' ';
                Ctx pc;
                memset(&pc, 0, sizeof pc);
                pc.rule_field = -1;
                pc.pname = names[k];
                pc.pvalue = values[k];
                if (render_into(e, e->record_fmt, &pc, &e->ctxbuf, &e->ctxcap, &clen, &ascii) < 0) goto end;
            }
            Ctx c = event_ctx(e, s, plan, date, dl);
            c.context.p = e->ctxbuf;
            c.context.n = clen;
            size_t len = 0;
            if (render_into(e, e->finished_dyn, &c, &e->line, &e->line_cap, &len, &ascii) < 0) goto end;
            if (grow(&e->line, &e->line_cap, len + 1) < 0) goto end;
            e->line[len] = '\n';
            line = line_str(e->line, len + 1, ascii);
        }
        if (line == NULL) goto end;
        int err = PyList_Append(lines, line);
        Py_DECREF(line);
        if (err < 0) goto end;
    }
    /* Everything read and rendered: now the lines and the counters count. */
    for (int t = 0; t < ntotals; t++)
        if (count_category(e, totals[t].category, totals[t].count) < 0) goto end;
    if (PyList_SetSlice(out, PyList_GET_SIZE(out), PyList_GET_SIZE(out), lines) < 0) goto end;
    if (PyList_GET_SIZE(hitkeys)) {
        if (e->per_hit == NULL && (e->per_hit = PyList_New(0)) == NULL) goto end;
        if (PyList_SetSlice(e->per_hit, PyList_GET_SIZE(e->per_hit), PyList_GET_SIZE(e->per_hit), hitkeys) < 0)
            goto end;
    }
    e->detections += detections;
    e->suppressed += suppressed;
    e->confirmed++;
    ok = 1;
end:
    Py_DECREF(lines);
    Py_DECREF(hitkeys);
    PyMem_Free(hits);
    PyMem_Free(done);
    PyMem_Free(totals);
    return ok;
}

static int pick_plan(Engine *e, const char *s, size_t len, int peer_plan) {
    if (peer_plan >= 0) return peer_plan;
    if (e->host_re == NULL || PyDict_GET_SIZE(e->by_host) == 0) return 0;
    int rc = re_match(e, e->host_re, s, len, 0, 0); /* compiled anchored */
    if (rc <= 0) return rc == PCRE2_ERROR_NOMATCH ? 0 : -2;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
    size_t a = 0, b = 0;
    for (int g = 1; g <= 2 && g < rc; g++) {
        if (ov[2 * g] != PCRE2_UNSET && ov[2 * g + 1] > ov[2 * g]) { a = ov[2 * g]; b = ov[2 * g + 1]; break; }
    }
    if (grow(&e->scratch, &e->scratch_cap, b - a + 1) < 0) return -3;
    for (size_t i = a; i < b; i++) e->scratch[i - a] = (char)lower((unsigned char)s[i]);
    PyObject *host = ascii_str(e->scratch, b - a);
    if (host == NULL) return -3;
    PyObject *plan = PyDict_GetItemWithError(e->by_host, host);
    Py_DECREF(host);
    if (plan == NULL) return PyErr_Occurred() ? -3 : 0;
    return (int)PyLong_AsLong(plan);
}

/* re.sub(pattern, literal, text) with Python's empty-match rule into e->rbuf[slot]; 0, -1 limit, -2 exception. */
static int replace_all(Engine *e, pcre2_code *code, PyObject *lit, const char *s, size_t len, int slot) {
    const char *out = PyBytes_AS_STRING(lit);
    size_t ol = (size_t)PyBytes_GET_SIZE(lit), at = 0, copied = 0, pos = 0;
    uint32_t opts = 0;
    for (;;) {
        int rc = re_match(e, code, s, len, pos, opts);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc <= 0) return -1;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t b = ov[0], en = ov[1];
        if (en < b) return -1;
        if (grow(&e->rbuf[slot], &e->rcap[slot], at + (b - copied) + ol + 1) < 0) return -2;
        memcpy(e->rbuf[slot] + at, s + copied, b - copied);
        at += b - copied;
        memcpy(e->rbuf[slot] + at, out, ol);
        at += ol;
        copied = en;
        opts = en == b ? PCRE2_NOTEMPTY_ATSTART : 0;
        pos = en;
        if (pos > len) break;
    }
    if (grow(&e->rbuf[slot], &e->rcap[slot], at + (len - copied) + 1) < 0) return -2;
    memcpy(e->rbuf[slot] + at, s + copied, len - copied);
    at += len - copied;
    e->cur = e->rbuf[slot];
    e->cur_len = at;
    return 0;
}

/* After the prefilter said MAYBE: the value's candidates, kept in e->found when there are any.
 * 0, REFER (the reference path decides the event) or -1 on error. */
static int found_push(Engine *e, int step, int lookup, const char *raw, size_t rn) {
    int refer;
    PyObject *cands = candidates(e, lookup, raw, rn, &refer);
    if (cands == NULL) return refer ? REFER : -1;
    if (cands == Py_None || PyList_GET_SIZE(cands) == 0) { /* nothing under the key: a Bloom or key coincidence */
        Py_DECREF(cands);
        return 0;
    }
    if (e->found == NULL && (e->found = PyList_New(0)) == NULL) { Py_DECREF(cands); return -1; }
    PyObject *item = Py_BuildValue("(iNN)", step, ascii_str(raw, rn), cands);
    if (item == NULL) return -1;
    int rc = PyList_Append(e->found, item);
    Py_DECREF(item);
    return rc;
}

/* 1: decided here (line in *line or none), 3: decided, ignored by an ignore rule, 2: some values may detect
 * (e->maybes, *plan_out; e->cur is the text), 0: reference path, -1: exception. */
static int decide(Engine *e, const char *s, size_t len, int peer_plan, const char *date, size_t date_len,
                  int finished, PyObject **line, int *plan_out) {
    *line = NULL;
    Py_CLEAR(e->found);
    e->cur = s;
    e->cur_len = len;
    int pi = pick_plan(e, s, len, peer_plan);
    *plan_out = pi;
    if (pi == -3) return -1;
    if (pi < 0 || pi >= e->nplans) return 0;
    const Plan *plan = &e->plans[pi];
    if (plan->reference) return 0;
    for (int i = 0; i < plan->nreplace; i++) {
        int rc = replace_all(e, plan->replace[i], plan->replace_out[i], e->cur, e->cur_len, i & 1);
        if (rc == -2) return -1;
        if (rc < 0) return 0;
    }
    if (plan->nreplace && memchr(e->cur, '\n', e->cur_len) != NULL) return 0; /* split into parts: reference */
    s = e->cur;
    len = e->cur_len;
    for (int f = 0; f < e->nfields; f++) e->fields[f].start = e->fields[f].end = 0;
    for (int i = 0; i < plan->nignore; i++) {
        int rc = re_match(e, plan->ignore[i], s, len, 0, 0);
        if (rc == PCRE2_ERROR_NOMATCH) continue;
        if (rc <= 0) return 0; /* a limit: the reference decides */
        /* Ignored: only the finished line, with the values of the context rules (matcher._context_only). */
        if (finished && e->template != NULL) {
            for (int k = 0; k < plan->nsteps; k++) {
                const Step *st = &plan->steps[k];
                if (st->lookup != L_CONTEXT) continue;
                int r = run_step(e, st, s, len, &e->values);
                if (r == -2) return -1;
                if (r < 0) return 0;
                if (e->values.n) e->fields[st->field] = e->values.v[0];
            }
            *line = render_finished(e, s, plan, date, date_len);
            if (*line == NULL) return -1;
        }
        return 3;
    }
    for (int k = 0; k < plan->nsteps; k++) {
        const Step *st = &plan->steps[k];
        int rc = run_step(e, st, s, len, &e->values);
        if (rc == -2) return -1;
        if (rc < 0) return 0;
        int used = k;
        if (e->values.n == 0 && st->fallback >= 0) {
            used = st->fallback;
            st = &plan->steps[st->fallback];
            rc = run_step(e, st, s, len, &e->values);
            if (rc == -2) return -1;
            if (rc < 0) return 0;
        }
        if (e->values.n == 0) continue;
        e->fields[st->field] = e->values.v[0];
        if (st->lookup == L_CONTEXT) continue;
        for (int v = 0; v < e->values.n; v++) {
            Span sp = e->values.v[v];
            int r = check_value(e, st->lookup, s + sp.start, sp.end - sp.start);
            if (r == FAILED) return -1;
            if (r == REFER) return 0;
            if (r == MAYBE) {
                r = found_push(e, used, st->lookup, s + sp.start, sp.end - sp.start);
                if (r < 0) return -1;
                if (r == REFER) return 0;
            }
        }
    }
    if (e->found != NULL) return 2;
    if (finished && e->template != NULL) {
        *line = render_finished(e, s, plan, date, date_len);
        if (*line == NULL) return -1;
    }
    return 1;
}

/* ---- the Engine type ----------------------------------------------------------------------------------- */

static void release_indexes(Engine *e) {
    for (int i = 0; i < e->nidx; i++) {
        Index *ix = &e->idx[i];
        PyBuffer_Release(&ix->keys);
        PyBuffer_Release(&ix->bloom);
        PyBuffer_Release(&ix->c4s);
        PyBuffer_Release(&ix->c4e);
        PyBuffer_Release(&ix->c6s);
        PyBuffer_Release(&ix->c6e);
        PyBuffer_Release(&ix->refs);
        PyBuffer_Release(&ix->c4off);
        PyBuffer_Release(&ix->c4refs);
        PyBuffer_Release(&ix->c4plen);
        PyBuffer_Release(&ix->c6off);
        PyBuffer_Release(&ix->c6refs);
        PyBuffer_Release(&ix->c6plen);
        PyBuffer_Release(&ix->grows);
        PyBuffer_Release(&ix->rkind);
        PyBuffer_Release(&ix->rflags);
        PyBuffer_Release(&ix->whole);
        Py_XDECREF(ix->owner);
        Py_XDECREF(ix->category);
        Py_XDECREF(ix->confidence);
        Py_XDECREF(ix->actionable);
        Py_XDECREF(ix->global_masks);
    }
    PyMem_Free(e->idx);
    e->idx = NULL;
    e->nidx = 0;
    e->kinds = 0;
    e->has_c4 = e->has_c6 = e->has_global = 0;
    e->nstores = 0;
    memset(e->store_kinds, 0, sizeof e->store_kinds);
    memset(e->store_global, 0, sizeof e->store_global);
}

static void free_plans(Engine *e) {
    for (int i = 0; i < e->nplans; i++) {
        Plan *p = &e->plans[i];
        for (int k = 0; k < p->ntotal; k++) if (p->steps[k].code) pcre2_code_free(p->steps[k].code);
        for (int k = 0; k < p->nignore; k++) if (p->ignore[k]) pcre2_code_free(p->ignore[k]);
        for (int k = 0; k < p->nreplace; k++) {
            if (p->replace[k]) pcre2_code_free(p->replace[k]);
            Py_XDECREF(p->replace_out[k]);
        }
        PyMem_Free(p->replace);
        PyMem_Free(p->replace_out);
        PyMem_Free(p->steps);
        PyMem_Free(p->ignore);
        Py_XDECREF(p->source_id);
    }
    PyMem_Free(e->plans);
    e->plans = NULL;
    e->nplans = 0;
}

static void Engine_dealloc(Engine *e) {
    release_indexes(e);
    free_plans(e);
    if (e->host_re) pcre2_code_free(e->host_re);
    if (e->fast_url) pcre2_code_free(e->fast_url);
    if (e->fast_domain) pcre2_code_free(e->fast_domain);
    if (e->md) pcre2_match_data_free(e->md);
    if (e->mctx) pcre2_match_context_free(e->mctx);
    if (e->jit) pcre2_jit_stack_free(e->jit);
    Py_XDECREF(e->by_host);
    Py_XDECREF(e->norm_url);
    Py_XDECREF(e->norm_domain);
    Py_XDECREF(e->norm_ip);
    Py_XDECREF(e->parse_ip);
    Py_XDECREF(e->template);
    PyMem_Free(e->fields);
    PyMem_Free(e->scratch);
    PyMem_Free(e->line);
    PyMem_Free(e->values.v);
    Py_XDECREF(e->found);
    Py_XDECREF(e->event_tmpl);
    Py_XDECREF(e->record_fmt);
    Py_XDECREF(e->action_fmt);
    Py_XDECREF(e->finished_dyn);
    Py_XDECREF(e->per_category);
    Py_XDECREF(e->per_hit);
    PyMem_Free(e->ctxbuf);
    PyMem_Free(e->actbuf);
    PyMem_Free(e->totbuf);
    for (int k = 0; k < 3; k++) PyMem_Free(e->colbuf[k]);
    PyMem_Free(e->rbuf[0]);
    PyMem_Free(e->rbuf[1]);

    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* (pattern text, options) -> compiled code; updates *maxgroups. */
static pcre2_code *compile_pair(PyObject *pair, uint32_t *maxgroups) {
    PyObject *text;
    unsigned int opts;
    if (!PyArg_ParseTuple(pair, "UI", &text, &opts)) return NULL;
    pcre2_code *code = compile_re(text, opts);
    if (code != NULL) {
        uint32_t g = capture_count(code);
        if (g > *maxgroups) *maxgroups = g;
    }
    return code;
}

/* Engine(plans, nfields, host_re, by_host, fast_url, fast_domain, normalisers, template)
 *   plans: list of (source_id bytes, reference bool, steps list, nsteps int, ignore list, replace list)
 *     replace: ((pattern, options), literal output bytes)
 *     step: ((pattern, options), groups, mode, all, lookup, field, fallback)
 *   host_re, fast_url, fast_domain: (pattern, options), options with PCRE2_ANCHORED (host_re) and
 *     PCRE2_ENDANCHORED (fast_url, fast_domain: full matches) at compile time, where JIT supports them;
 *     host_re may be None
 *   normalisers: (normalize_url, normalize_domain, normalize_ip, parse_ip)
 *   template: tuple of bytes / int, or None (no finished line)                                            */
static int Engine_init(Engine *e, PyObject *args, PyObject *kw) {
    PyObject *plans, *host, *by_host, *furl, *fdom, *norms, *tmpl;
    int nfields;
    if (!PyArg_ParseTuple(args, "O!iOO!OOO!O", &PyList_Type, &plans, &nfields, &host, &PyDict_Type, &by_host, &furl,
                          &fdom, &PyTuple_Type, &norms, &tmpl))
        return -1;
    if (e->plans != NULL || e->md != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    uint32_t maxgroups = 2;
    e->nfields = nfields;
    e->fields = PyMem_Calloc((size_t)(nfields > 0 ? nfields : 1), sizeof(Span));
    if (e->fields == NULL) { PyErr_NoMemory(); return -1; }
    Py_ssize_t np = PyList_GET_SIZE(plans);
    e->plans = PyMem_Calloc((size_t)(np ? np : 1), sizeof(Plan));
    if (e->plans == NULL) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < np; i++) {
        Plan *p = &e->plans[i];
        e->nplans = (int)i + 1;
        PyObject *sid, *steps, *ignore, *replace;
        int reference, nsteps;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(plans, i), "SpO!iO!O!", &sid, &reference, &PyList_Type, &steps, &nsteps,
                              &PyList_Type, &ignore, &PyList_Type, &replace))
            return -1;
        Py_INCREF(sid);
        p->source_id = sid;
        p->reference = reference;
        p->ntotal = (int)PyList_GET_SIZE(steps);
        p->nsteps = nsteps;
        p->steps = PyMem_Calloc((size_t)(p->ntotal ? p->ntotal : 1), sizeof(Step));
        p->nignore = (int)PyList_GET_SIZE(ignore);
        p->ignore = PyMem_Calloc((size_t)(p->nignore ? p->nignore : 1), sizeof(pcre2_code *));
        p->nreplace = (int)PyList_GET_SIZE(replace);
        p->replace = PyMem_Calloc((size_t)(p->nreplace ? p->nreplace : 1), sizeof(pcre2_code *));
        p->replace_out = PyMem_Calloc((size_t)(p->nreplace ? p->nreplace : 1), sizeof(PyObject *));
        if (p->steps == NULL || p->ignore == NULL || p->replace == NULL || p->replace_out == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (int k = 0; k < p->nreplace; k++) {
            PyObject *pair, *lit;
            if (!PyArg_ParseTuple(PyList_GET_ITEM(replace, k), "OS", &pair, &lit)) return -1;
            Py_INCREF(lit);
            p->replace_out[k] = lit;
            p->replace[k] = compile_pair(pair, &maxgroups);
            if (p->replace[k] == NULL) return -1;
        }
        for (int k = 0; k < p->ntotal; k++) {
            Step *st = &p->steps[k];
            PyObject *pair;
            unsigned int groups;
            if (!PyArg_ParseTuple(PyList_GET_ITEM(steps, k), "OIiiiii", &pair, &groups, &st->mode, &st->all,
                                  &st->lookup, &st->field, &st->fallback))
                return -1;
            st->groups = groups;
            if (st->field < 0 || st->field >= nfields || st->fallback >= p->ntotal) {
                PyErr_SetString(PyExc_ValueError, "a step names a field or fallback out of range");
                return -1;
            }
            st->code = compile_pair(pair, &maxgroups);
            if (st->code == NULL) return -1;
        }
        for (int k = 0; k < p->nignore; k++) {
            p->ignore[k] = compile_pair(PyList_GET_ITEM(ignore, k), &maxgroups);
            if (p->ignore[k] == NULL) return -1;
        }
    }
    if (host != Py_None && (e->host_re = compile_pair(host, &maxgroups)) == NULL) return -1;
    if ((e->fast_url = compile_pair(furl, &maxgroups)) == NULL) return -1;
    if ((e->fast_domain = compile_pair(fdom, &maxgroups)) == NULL) return -1;
    Py_INCREF(by_host);
    e->by_host = by_host;
    if (!PyArg_ParseTuple(norms, "OOOO", &e->norm_url, &e->norm_domain, &e->norm_ip, &e->parse_ip)) return -1;
    Py_INCREF(e->norm_url);
    Py_INCREF(e->norm_domain);
    Py_INCREF(e->norm_ip);
    Py_INCREF(e->parse_ip);
    if (tmpl != Py_None) {
        if (!PyTuple_Check(tmpl)) { PyErr_SetString(PyExc_TypeError, "template must be a tuple or None"); return -1; }
        Py_INCREF(tmpl);
        e->template = tmpl;
    }
    e->md = pcre2_match_data_create(maxgroups + 1, NULL);
    e->mctx = pcre2_match_context_create(NULL);
    e->jit = pcre2_jit_stack_create(32 * 1024, 1024 * 1024, NULL);
    if (e->md == NULL || e->mctx == NULL || e->jit == NULL) { PyErr_NoMemory(); return -1; }
    pcre2_jit_stack_assign(e->mctx, NULL, e->jit);
    return 0;
}

static int get_buf(PyObject *obj, Py_buffer *b, Py_ssize_t itemsize, Py_ssize_t *count, const char *what) {
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (b->len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zd-byte items", what, b->len, itemsize);
        return -1;
    }
    if (count) *count = b->len / itemsize;
    return 0;
}

/* use_indexes(views): views as IndicatorStore.engine_views() gives them. */
static PyObject *Engine_use_indexes(Engine *e, PyObject *views) {
    PyObject *seq = PySequence_Fast(views, "views must be a sequence");
    if (seq == NULL) return NULL;
    release_indexes(e);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    e->idx = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Index));
    if (e->idx == NULL) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++) {
        Index *ix = &e->idx[i];
        e->nidx = (int)i + 1;
        PyObject *keys, *bloom, *c4s, *c4e, *c6s, *c6e, *gm;
        PyObject *refs, *c4off, *c4refs, *c4plen, *c6off, *c6refs, *c6plen, *grows, *rkind, *rflags, *whole, *owner;
        PyObject *category, *confidence, *actionable;
        unsigned long long mask;
        unsigned int kinds;
        Py_ssize_t n4e, n6e, nrefs, n4off, n4refs, n4plen, n6off, n6refs, n6plen, nflags;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "OOKIOOOOOiiOOOOOOOOOO(iO(KKK)(KKK)(KKK)O)SSiO!", &keys,
                              &bloom, &mask, &kinds, &c4s, &c4e, &c6s, &c6e, &gm, &ix->slot, &ix->store, &refs, &c4off,
                              &c4refs, &c4plen, &c6off, &c6refs, &c6plen, &grows, &rkind, &rflags, &ix->fd, &whole,
                              &ix->off_at[0], &ix->off_at[1], &ix->off_at[2], &ix->blob_at[0], &ix->blob_at[1],
                              &ix->blob_at[2], &ix->blob_len[0], &ix->blob_len[1], &ix->blob_len[2], &owner, &category,
                              &confidence, &ix->supplier, &PyTuple_Type, &actionable))
            goto fail;
        ix->owner = Py_NewRef(owner);
        ix->category = Py_NewRef(category);
        ix->confidence = Py_NewRef(confidence);
        ix->actionable = Py_NewRef(actionable);
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(actionable); k++) {
            if (!PyBytes_Check(PyTuple_GET_ITEM(actionable, k))) {
                PyErr_SetString(PyExc_TypeError, "actionable field names must be bytes");
                goto fail;
            }
        }
        if (ix->store < 0 || ix->store >= MAX_STORES) {
            PyErr_SetString(PyExc_ValueError, "store number out of range");
            goto fail;
        }
        if (get_buf(refs, &ix->refs, 4, &nrefs, "refs") < 0 || get_buf(c4off, &ix->c4off, 4, &n4off, "cidr4_off") < 0 ||
            get_buf(c4refs, &ix->c4refs, 4, &n4refs, "cidr4_refs") < 0 ||
            get_buf(c4plen, &ix->c4plen, 1, &n4plen, "cidr4_plen") < 0 ||
            get_buf(c6off, &ix->c6off, 4, &n6off, "cidr6_off") < 0 ||
            get_buf(c6refs, &ix->c6refs, 4, &n6refs, "cidr6_refs") < 0 ||
            get_buf(c6plen, &ix->c6plen, 1, &n6plen, "cidr6_plen") < 0 ||
            get_buf(grows, &ix->grows, 4, &ix->ngrows, "global_masks") < 0 ||
            get_buf(rkind, &ix->rkind, 1, &ix->nrecords, "rec_kind") < 0 ||
            get_buf(rflags, &ix->rflags, 1, &nflags, "rec_flags") < 0)
            goto fail;
        if (ix->fd < 0 && (whole == Py_None || get_buf(whole, &ix->whole, 1, NULL, "snapshot") < 0)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "an in-memory index needs its bytes");
            goto fail;
        }
        if (get_buf(keys, &ix->keys, 8, &ix->nkeys, "keys") < 0 || get_buf(bloom, &ix->bloom, 1, NULL, "bloom") < 0 ||
            get_buf(c4s, &ix->c4s, 4, &ix->n4, "cidr4_start") < 0 || get_buf(c4e, &ix->c4e, 4, &n4e, "cidr4_end") < 0 ||
            get_buf(c6s, &ix->c6s, 16, &ix->n6, "cidr6_start") < 0 || get_buf(c6e, &ix->c6e, 16, &n6e, "cidr6_end") < 0)
            goto fail;
        int bad = n4e != ix->n4 || n6e != ix->n6 || nrefs != ix->nkeys || n4refs != n4plen || n6refs != n6plen ||
                  nflags != ix->nrecords || (ix->n4 && n4off != ix->n4 + 1) || (ix->n6 && n6off != ix->n6 + 1) ||
                  (n4off && ((const uint32_t *)ix->c4off.buf)[n4off - 1] > (uint32_t)n4refs) ||
                  (n6off && ((const uint32_t *)ix->c6off.buf)[n6off - 1] > (uint32_t)n6refs);
        for (Py_ssize_t k = 1; !bad && k < n4off; k++)
            bad = ((const uint32_t *)ix->c4off.buf)[k] < ((const uint32_t *)ix->c4off.buf)[k - 1];
        for (Py_ssize_t k = 1; !bad && k < n6off; k++)
            bad = ((const uint32_t *)ix->c6off.buf)[k] < ((const uint32_t *)ix->c6off.buf)[k - 1];
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "an index's sections do not agree in size or order");
            goto fail;
        }
        if (ix->nkeys && (mask + 1 == 0 || ((mask + 1) & mask) || (Py_ssize_t)((mask + 1) / 8) > ix->bloom.len)) {
            PyErr_SetString(PyExc_ValueError, "the Bloom mask does not fit the bitmap");
            goto fail;
        }
        ix->bloom_mask = mask;
        ix->kinds = kinds;
        /* global masks: tuple of parts (str) -> the mask as UTF-8 bytes, its parts joined at their stars */
        PyObject *gseq = PySequence_Fast(gm, "global masks must be a sequence");
        if (gseq == NULL) goto fail;
        Py_ssize_t ng = PySequence_Fast_GET_SIZE(gseq);
        ix->global_masks = PyTuple_New(ng);
        if (ix->global_masks == NULL) { Py_DECREF(gseq); goto fail; }
        PyObject *star = PyUnicode_FromString("*");
        for (Py_ssize_t j = 0; star != NULL && j < ng; j++) {
            PyObject *text = PyUnicode_Join(star, PySequence_Fast_GET_ITEM(gseq, j));
            PyObject *b = text ? PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass") : NULL;
            Py_XDECREF(text);
            if (b == NULL) { Py_CLEAR(star); break; }
            PyTuple_SET_ITEM(ix->global_masks, j, b);
        }
        if (star == NULL) { Py_DECREF(gseq); goto fail; }
        Py_DECREF(star);
        Py_DECREF(gseq);
        e->kinds |= ix->nkeys ? kinds : 0;
        if (ix->store + 1 > e->nstores) e->nstores = ix->store + 1;
        e->store_kinds[ix->store] |= kinds;
        e->store_global[ix->store] |= ix->ngrows > 0;
        e->has_c4 |= ix->n4 > 0;
        e->has_c6 |= ix->n6 > 0;
        e->has_global |= ng > 0;
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    release_indexes(e);
    return NULL;
}

/* use_detection(event_format, record_field_format, actionable_field_format, finished_dynamic, needs_context, limit):
 * detection lines rendered here (templates as tuples of bytes and field codes); None to leave them to Python. */
static PyObject *Engine_use_detection(Engine *e, PyObject *args) {
    PyObject *ev, *rf, *af, *fd;
    int needs;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOOOpn", &ev, &rf, &af, &fd, &needs, &limit)) return NULL;
    Py_CLEAR(e->event_tmpl);
    Py_CLEAR(e->record_fmt);
    Py_CLEAR(e->action_fmt);
    Py_CLEAR(e->finished_dyn);
    if (ev == Py_None) Py_RETURN_NONE;
    if (!PyTuple_Check(ev) || !PyTuple_Check(rf) || !PyTuple_Check(af) || !PyTuple_Check(fd)) {
        PyErr_SetString(PyExc_TypeError, "templates must be tuples");
        return NULL;
    }
    e->event_tmpl = Py_NewRef(ev);
    e->record_fmt = Py_NewRef(rf);
    e->action_fmt = Py_NewRef(af);
    e->finished_dyn = Py_NewRef(fd);
    e->needs_context = needs;
    e->limit = limit;
    Py_RETURN_NONE;
}

/* (event, plan, fields, found) of the event just decided with answer 2, for the detect callback:
 * fields: tuple of str or None per field; found: list of (step number, raw value, candidates). */
static PyObject *detect_args(Engine *e, PyObject *ev, const char *s, int plan) {
    PyObject *fields = PyTuple_New(e->nfields);
    if (fields == NULL) return NULL;
    for (int f = 0; f < e->nfields; f++) {
        Span sp = e->fields[f];
        PyObject *v = sp.end > sp.start ? ascii_str(s + sp.start, sp.end - sp.start) : Py_NewRef(Py_None);
        if (v == NULL) { Py_DECREF(fields); return NULL; }
        PyTuple_SET_ITEM(fields, f, v);
    }
    PyObject *found = e->found;
    e->found = NULL;
    return Py_BuildValue("(OiNN)", ev, plan, fields, found);
}

/* match(events, peer_plan, date, finished, out, reference, detect) -> (events decided here, of which ignored).
 * `reference(event)` runs the reference path for one event; `detect(event, plan, fields, maybes)` finishes
 * an event some of whose values may detect (both append their lines to `out` themselves). */
static PyObject *Engine_match(Engine *e, PyObject *args) {
    PyObject *events, *out, *ref, *detect;
    int peer_plan, finished;
    const char *date;
    Py_ssize_t date_len;
    if (!PyArg_ParseTuple(args, "O!is#pO!OO", &PyList_Type, &events, &peer_plan, &date, &date_len, &finished,
                          &PyList_Type, &out, &ref, &detect))
        return NULL;
    if (e->md == NULL) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    if (peer_plan >= e->nplans) { PyErr_SetString(PyExc_ValueError, "peer_plan out of range"); return NULL; }
    Py_ssize_t decided = 0, ignored = 0;
    /* A private copy: the callbacks run Python code, which may let another thread change the caller's list. */
    events = PyList_GetSlice(events, 0, PyList_GET_SIZE(events));
    if (events == NULL) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(events);
    e->detections = e->suppressed = e->confirmed = 0;
    Py_CLEAR(e->per_category);
    Py_CLEAR(e->per_hit);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        int rc = 0, plan = 0;
        PyObject *line = NULL;
        if (PyUnicode_CheckExact(ev) && PyUnicode_IS_ASCII(ev))
            rc = decide(e, PyUnicode_DATA(ev), (size_t)PyUnicode_GET_LENGTH(ev), peer_plan, date, (size_t)date_len,
                        finished, &line, &plan);
        if (rc < 0) goto fail;
        if (rc == 2) {
            int r = detect_c(e, &e->plans[plan], e->cur, e->found, date, (size_t)date_len, finished, out);
            if (r < 0) goto fail;
            if (r == 1) {
                e->detect_events++;
                Py_CLEAR(e->found);
                continue;
            }
        }
        if (rc == 2) {
            e->detect_events++;
            PyObject *a = detect_args(e, ev, e->cur, plan);
            if (a == NULL) goto fail;
            PyObject *r = PyObject_Call(detect, a, NULL);
            Py_DECREF(a);
            if (r == NULL) goto fail;
            Py_DECREF(r);
            continue;
        }
        if (rc == 3) ignored++;
        if (rc == 1 || rc == 3) {
            decided++;
            if (line != NULL) {
                int err = PyList_Append(out, line);
                Py_DECREF(line);
                if (err < 0) goto fail;
            }
            continue;
        }
        e->reference_events++;
        PyObject *r = PyObject_CallOneArg(ref, ev);
        if (r == NULL) goto fail;
        Py_DECREF(r);
    }
    PyObject *cats = e->per_category ? e->per_category : Py_None;
    PyObject *hitlist = e->per_hit ? e->per_hit : Py_None;
    PyObject *result =
        Py_BuildValue("(nnnnnOO)", decided, ignored, e->confirmed, e->detections, e->suppressed, cats, hitlist);
    Py_CLEAR(e->per_category);
    Py_CLEAR(e->per_hit);
    Py_DECREF(events);
    return result;
fail:
    Py_DECREF(events);
    return NULL;
}

/* One REST lookup object, classified as Matcher.lookup_object does: its candidates (a new list), Py_None when
 * it certainly detects nothing, Py_True when the reference must classify and look it up, NULL on error. */
static PyObject *lookup_one(Engine *e, PyObject *v) {
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) Py_RETURN_TRUE;
    const char *p = PyUnicode_DATA(v);
    size_t n = (size_t)PyUnicode_GET_LENGTH(v);
    while (n && py_space((unsigned char)*p)) { p++; n--; }
    while (n && py_space((unsigned char)p[n - 1])) n--;
    int lookup = L_URL;
    if (n == 32 || n == 40 || n == 64) {
        size_t i = 0;
        while (i < n && is_hex(lower((unsigned char)p[i]))) i++;
        if (i == n) lookup = L_HASH;
    }
    if (lookup == L_URL && memchr(p, '/', n) == NULL) {
        if (parse_v4(p, n) >= 0) lookup = L_IP;
        else if (memchr(p, ':', n) != NULL) Py_RETURN_TRUE; /* maybe IPv6: the reference classifies it */
    }
    int r = check_value(e, lookup, p, n);
    if (r == FAILED) return NULL;
    if (r == MISS) Py_RETURN_NONE;
    if (r == REFER) Py_RETURN_TRUE;
    int refer;
    PyObject *cands = candidates(e, lookup, p, n, &refer);
    if (cands == NULL && refer) Py_RETURN_TRUE;
    return cands;
}

/* lookup(objects) -> list: per object None (detects nothing), True (the reference must look it up) or its
 * candidates as (slot, row, kind, probe) tuples, for Matcher._confirm. */
static PyObject *Engine_lookup(Engine *e, PyObject *objects) {
    if (e->md == NULL) { PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised"); return NULL; }
    PyObject *seq = PySequence_Fast(objects, "objects must be a sequence of str");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *r = lookup_one(e, PySequence_Fast_GET_ITEM(seq, i));
        if (r == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, r);
    }
    Py_DECREF(seq);
    return out;
}

static PyObject *Engine_reference_events(Engine *e, void *closure) { return PyLong_FromSsize_t(e->reference_events); }
static PyObject *Engine_detect_events(Engine *e, void *closure) { return PyLong_FromSsize_t(e->detect_events); }

static PyMethodDef Engine_methods[] = {
    {"use_indexes", (PyCFunction)Engine_use_indexes, METH_O, "Swap in the store's indexes (engine_views())."},
    {"match", (PyCFunction)Engine_match, METH_VARARGS, "Match a batch; returns how many events were decided here."},
    {"lookup", (PyCFunction)Engine_lookup, METH_O, "REST lookup objects: None, True or their candidates."},
    {"use_detection", (PyCFunction)Engine_use_detection, METH_VARARGS, "Render detection lines in C (templates)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"reference_events", (getter)Engine_reference_events, NULL, "Events handed to the reference path so far.", NULL},
    {"detect_events", (getter)Engine_detect_events, NULL, "Events with values that may detect, so far.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "threatgate.node._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled batch engine (see node/engine.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* ---- module functions -------------------------------------------------------------------------------- */

static PyObject *key_of(PyObject *self, PyObject *args) {
    int kind;
    const char *data;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "iy#", &kind, &data, &len)) return NULL;
    return PyLong_FromUnsignedLongLong(XXH3_64bits_withSeed(data, (size_t)len, (XXH64_hash_t)kind));
}

/* keys_of(kinds, values) -> bytes: the uint64 keys (native order) of values[i] with kind kinds[i]. */
static PyObject *keys_of(PyObject *self, PyObject *args) {
    Py_buffer kinds;
    PyObject *values;
    if (!PyArg_ParseTuple(args, "y*O", &kinds, &values)) return NULL;
    PyObject *seq = PySequence_Fast(values, "values must be a sequence of str");
    PyObject *out = NULL;
    if (seq == NULL) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != kinds.len) { PyErr_SetString(PyExc_ValueError, "kinds and values differ in length"); goto done; }
    out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL) goto done;
    uint64_t *keys = (uint64_t *)PyBytes_AS_STRING(out);
    const signed char *k = (const signed char *)kinds.buf;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        if (!PyUnicode_Check(v)) { Py_CLEAR(out); PyErr_SetString(PyExc_TypeError, "values must be str"); goto done; }
        if (PyUnicode_IS_ASCII(v)) {
            keys[i] = XXH3_64bits_withSeed(PyUnicode_DATA(v), (size_t)PyUnicode_GET_LENGTH(v), (XXH64_hash_t)k[i]);
        } else {
            PyObject *b = PyUnicode_AsEncodedString(v, "utf-8", "surrogatepass");
            if (b == NULL) { Py_CLEAR(out); goto done; }
            keys[i] = XXH3_64bits_withSeed(PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b), (XXH64_hash_t)k[i]);
            Py_DECREF(b);
        }
    }
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&kinds);
    return out;
}

/* compile_error(pattern, options) -> None, or PCRE2's reason in words. */
static PyObject *compile_error(PyObject *self, PyObject *args) {
    PyObject *text;
    unsigned int opts;
    if (!PyArg_ParseTuple(args, "UI", &text, &opts)) return NULL;
    pcre2_code *code = compile_re(text, opts);
    if (code != NULL) {
        pcre2_code_free(code);
        Py_RETURN_NONE;
    }
    if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *msg = PyObject_Str(value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return msg;
}

/* re_findall(pattern, options, groups, mode, all, text) -> list[str]: one step's values (for the tests). */
static PyObject *step_values(PyObject *self, PyObject *args) {
    PyObject *text, *subject;
    unsigned int opts, groups;
    int mode, all;
    if (!PyArg_ParseTuple(args, "UIIiiU", &text, &opts, &groups, &mode, &all, &subject)) return NULL;
    if (!PyUnicode_IS_ASCII(subject)) { PyErr_SetString(PyExc_ValueError, "ASCII subjects only"); return NULL; }
    pcre2_code *code = compile_re(text, opts);
    if (code == NULL) return NULL;
    Engine e;
    memset(&e, 0, sizeof e);
    e.md = pcre2_match_data_create(capture_count(code) + 1, NULL);
    e.mctx = pcre2_match_context_create(NULL);
    Step st = {code, groups, mode, all, L_CONTEXT, 0, -1};
    Spans sp = {NULL, 0, 0};
    const char *s = PyUnicode_DATA(subject);
    int rc = run_step(&e, &st, s, (size_t)PyUnicode_GET_LENGTH(subject), &sp);
    PyObject *out = NULL;
    if (rc == 0) {
        out = PyList_New(sp.n);
        for (int i = 0; out && i < sp.n; i++) {
            PyObject *v = ascii_str(s + sp.v[i].start, sp.v[i].end - sp.v[i].start);
            if (v == NULL) { Py_CLEAR(out); break; }
            PyList_SET_ITEM(out, i, v);
        }
    } else if (rc == -1) {
        PyErr_SetString(PyExc_RuntimeError, "PCRE2 gave up (a match limit)");
    }
    PyMem_Free(sp.v);
    pcre2_match_data_free(e.md);
    pcre2_match_context_free(e.mctx);
    pcre2_code_free(code);
    return out;
}

static PyMethodDef methods[] = {
    {"key_of", key_of, METH_VARARGS, "key_of(kind, utf8_bytes) -> the store's 64-bit key (XXH3-64, seed = kind)."},
    {"keys_of", keys_of, METH_VARARGS, "keys_of(kinds: int8 buffer, values: list[str]) -> bytes of uint64 keys."},
    {"compile_error", compile_error, METH_VARARGS, "compile_error(pattern, options) -> None or PCRE2's reason."},
    {"step_values", step_values, METH_VARARGS, "step_values(pattern, options, groups, mode, all, text) -> values."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "threatgate.node._engine", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    /* Bumped when Python and C must change together (engine.py refuses another value: rebuild the module). */
    if (PyModule_AddIntConstant(m, "INTERFACE", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
