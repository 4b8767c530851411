/*
 * bench.c — libloldu against the bare frozen layer, in one process, on the same GEMM library.
 *
 * Sections (all by default; `--sections steps,init,bf16,grouped,load` picks some):
 *   steps    One training step (forward + backward with dX) on each compute path and on AUTO, as a
 *            ratio to the bare layer's two GEMMs (x Wᵀ and dY W) computed by the library itself
 *            (a disabled adapter: exactly those two products, through the same GEMM library),
 *            next to the step's FLOP lower bound (docs/design.md). OpenBLAS's own SGEMMs are timed
 *            alongside. z changes before every step, as in training, so a merged weight must be
 *            rebuilt each time.
 *   init     loldu_adapter_create (panel LU) against LAPACK's full getrf of W.
 *   bf16     The same steps in bfloat16: our bf16 step against our float32 step and against the
 *            bare bf16 layer (a disabled bf16 adapter), every path, and the same adapter forced
 *            to the widened float32 GEMMs (loldu_set_widened_half).
 *   grouped  Many adapters derived from one base in one batch: loldu_grouped_forward/backward
 *            over N = 1, 16, 256, 4096 adapters as a ratio to N = 1 through the same call; one
 *            adapter's own loldu_forward/backward for reference; memory per derived adapter
 *            (mallinfo2), its gradients and an optimiser's state.
 *   load     Adding a saved adapter to a loaded base: open + layer + derive + apply, the first
 *            adapter on a new base and the next, each call timed; the base's creation alongside.
 *
 * The JSON output also lists the shapes (shape_list, group_shapes, group_counts): the Python
 * benchmark (bench/bench_torch.py) takes its shapes from there, so both measure the same list.
 *
 *     bench [--markdown FILE] [--json FILE] [--quick] [--sections LIST]
 *
 * Every figure is a median of per-repetition ratios against a baseline measured in the same
 * repetition; the contenders of a repetition run back to back in an order that rotates.
 */
#define _GNU_SOURCE
#include <cblas.h>
#include <dirent.h>
#include <lapacke.h>
#include <loldu.h>
#include <malloc.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define CHECK(call)                                                                            \
    do {                                                                                       \
        loldu_status s_ = (call);                                                              \
        if (s_ != LOLDU_OK) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, loldu_last_error()); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* ---- small helpers ------------------------------------------------------------------------ */

typedef struct { char *text; size_t len, cap; } buffer;

static void put(buffer *b, const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    va_list copy;
    va_copy(copy, ap);
    int need = vsnprintf(NULL, 0, format, copy);
    va_end(copy);
    if (need < 0) { va_end(ap); return; }
    if (b->len + (size_t)need + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + (size_t)need + 1) cap *= 2;
        char *grown = realloc(b->text, cap);
        if (!grown) { perror("realloc"); exit(1); }
        b->text = grown;
        b->cap = cap;
    }
    vsnprintf(b->text + b->len, (size_t)need + 1, format, ap);
    b->len += (size_t)need;
    va_end(ap);
}

static const char *text(const buffer *b) { return b->text ? b->text : ""; }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *checked_malloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { perror("malloc"); exit(1); }
    return p;
}

static float *random_matrix(long count, unsigned seed, float scale) {
    float *a = checked_malloc(sizeof(float) * (size_t)count);
    unsigned long long s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (long i = 0; i < count; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        a[i] = scale * ((float)(s >> 40) / (float)(1ull << 24) - 0.5f);
    }
    return a;
}

/* The float32 buffers of a step on an m × n layer at rank r and B rows: W (m × n), X (B × n)
   and dY (B × m) random from their seeds, Y, dX and H work space. */
typedef struct { float *w, *x, *dy, *y, *dx, *h; } buffers;

static buffers make_buffers(int m, int n, int r, int b, unsigned w_seed, unsigned x_seed, unsigned dy_seed) {
    buffers t;
    t.w = random_matrix((long)m * n, w_seed, 0.1f);
    t.x = random_matrix((long)b * n, x_seed, 1.0f);
    t.dy = random_matrix((long)b * m, dy_seed, 1.0f);
    t.y = checked_malloc(sizeof(float) * (size_t)b * m);
    t.dx = checked_malloc(sizeof(float) * (size_t)b * n);
    t.h = checked_malloc(sizeof(float) * (size_t)b * r);
    return t;
}

static void free_buffers(buffers t) {
    free(t.w); free(t.x); free(t.dy); free(t.y); free(t.dx); free(t.h);
}

/* float -> bfloat16, round to nearest even (the values here are finite). */
static uint16_t *to_bf16(const float *a, long count) {
    uint16_t *out = checked_malloc(sizeof(uint16_t) * (size_t)count);
    for (long i = 0; i < count; i++) {
        uint32_t u;
        memcpy(&u, &a[i], sizeof u);
        u += 0x7FFFu + ((u >> 16) & 1u);
        out[i] = (uint16_t)(u >> 16);
    }
    return out;
}

/* bfloat16 bits -> float (exact). */
static float bf16_value(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float v;
    memcpy(&v, &u, sizeof u);
    return v;
}

static float *from_bf16(const uint16_t *a, long count) {
    float *out = checked_malloc(sizeof(float) * (size_t)count);
    for (long i = 0; i < count; i++) out[i] = bf16_value(a[i]);
    return out;
}

/* ‖a − ref‖ / ‖ref‖ (Frobenius), the values as float32 (`a`) or as bf16 bits (`bits`): one of the two. */
static double relative_error(const float *a, const uint16_t *bits, const float *ref, long count) {
    if (!a == !bits) {
        fprintf(stderr, "relative_error: give a or bits\n");
        exit(1);
    }
    double num = 0, den = 0;
    for (long i = 0; i < count; i++) {
        float v = bits ? bf16_value(bits[i]) : a[i];
        num += ((double)v - ref[i]) * ((double)v - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / den);
}

/* What bf16 operands cost in precision, against a float32 adapter on the same bf16 values (same
   factors), z = D_r ⊙ (1 + e ξ) with ξ uniform in [−1, 1), σ = 1 and e such that W_eff moves 20%
   from W (as LoLDU on every linear layer of the study in docs/results.md): relative errors of y
   from `merged` (the merged path: W_eff built from bf16 operands), from it after loldu_merge (W_eff
   from float32 operands, rounded once), `factored` and `wide` (float32 operands, y rounded once),
   and of dz from `wgrad` (merged_wgrad) and `factored`. */
typedef struct { double y_merged, y_merged_exact, y_factored, y_wide, dz_wgrad, dz_factored; } bf16_precision;

static bf16_precision measure_bf16_precision(loldu_adapter *merged, loldu_adapter *wgrad, loldu_adapter *factored,
                                             loldu_adapter *wide, const uint16_t *wb, const uint16_t *xb,
                                             const uint16_t *dyb, int m, int n, int r, int b) {
    long mn = (long)m * n, bm = (long)b * m;
    float *wf = from_bf16(wb, mn), *xf = from_bf16(xb, (long)b * n), *dyf = from_bf16(dyb, bm);
    loldu_config config;
    CHECK(loldu_config_default(&config));
    config.rank = r;
    loldu_adapter *ref = NULL;
    CHECK(loldu_adapter_create(&ref, LOLDU_FLOAT32, m, n, wf, NULL, &config));
    float *xi = random_matrix(r, 77, 2.0f), *z = checked_malloc(sizeof(float) * (size_t)r);
    float *d = checked_malloc(sizeof(float) * (size_t)r), *weff = checked_malloc(sizeof(float) * (size_t)mn);
    CHECK(loldu_get_factor(ref, LOLDU_FACTOR_DIAG, d));
    for (int k = 0; k < r; k++) z[k] = d[k] * (1 + xi[k]);  /* e = 1; W_eff − W is linear in e */
    CHECK(loldu_set_z(ref, z));
    CHECK(loldu_effective_weight(ref, weff));
    double e = 0.20 / relative_error(weff, NULL, wf, mn);
    for (int k = 0; k < r; k++) z[k] = d[k] * (float)(1 + e * xi[k]);
    loldu_adapter *all[5] = {ref, merged, wgrad, factored, wide};
    for (int i = 0; i < 5; i++) {
        CHECK(loldu_set_z(all[i], z));
        CHECK(loldu_set_sigma(all[i], 1.0));
        CHECK(loldu_zero_grad(all[i]));
    }
    float *y = checked_malloc(sizeof(float) * (size_t)bm);
    uint16_t *yb = checked_malloc(sizeof(uint16_t) * (size_t)bm);
    bf16_precision p;
    CHECK(loldu_forward(ref, b, xf, y, NULL));
    CHECK(loldu_forward(merged, b, xb, yb, NULL));
    p.y_merged = relative_error(NULL, yb, y, bm);
    CHECK(loldu_merge(merged));
    CHECK(loldu_forward(merged, b, xb, yb, NULL));
    CHECK(loldu_unmerge(merged));
    p.y_merged_exact = relative_error(NULL, yb, y, bm);
    CHECK(loldu_forward(factored, b, xb, yb, NULL));
    p.y_factored = relative_error(NULL, yb, y, bm);
    CHECK(loldu_forward(wide, b, xb, yb, NULL));
    p.y_wide = relative_error(NULL, yb, y, bm);
    void *g_ref, *g;
    CHECK(loldu_backward(ref, b, xf, dyf, NULL, NULL));
    CHECK(loldu_params(ref, NULL, &g_ref));
    CHECK(loldu_backward(wgrad, b, xb, dyb, NULL, NULL));
    CHECK(loldu_params(wgrad, NULL, &g));
    p.dz_wgrad = relative_error(g, NULL, g_ref, r);
    CHECK(loldu_backward(factored, b, xb, dyb, NULL, NULL));
    CHECK(loldu_params(factored, NULL, &g));
    p.dz_factored = relative_error(g, NULL, g_ref, r);
    loldu_adapter_free(ref);
    free(wf); free(xf); free(dyf); free(xi); free(z); free(d); free(weff); free(y); free(yb);
    return p;
}

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n values (sorts a copy). */
static double median(const double *v, int n) {
    double *c = checked_malloc(sizeof(double) * (size_t)n);
    memcpy(c, v, sizeof(double) * (size_t)n);
    qsort(c, (size_t)n, sizeof(double), compare_double);
    double m = n % 2 ? c[n / 2] : 0.5 * (c[n / 2 - 1] + c[n / 2]);
    free(c);
    return m;
}

/* Median over repetitions of num[rep] − den[rep]. */
static double mdiff(const double *num, const double *den, int n) {
    double *r = checked_malloc(sizeof(double) * (size_t)n);
    for (int i = 0; i < n; i++) r[i] = num[i] - den[i];
    double m = median(r, n);
    free(r);
    return m;
}

/* Median over repetitions of num[rep] / den[rep]. */
static double median_ratio(const double *num, const double *den, int n) {
    double *r = checked_malloc(sizeof(double) * (size_t)n);
    for (int i = 0; i < n; i++) r[i] = num[i] / den[i];
    double m = median(r, n);
    free(r);
    return m;
}

/* FLOPs of a training step on each path (docs/design.md), h kept from forward to backward. */
static double step_flops(int path, double m, double n, double r, double b) {
    switch (path) {
    case LOLDU_PATH_FACTORED: return 4 * b * m * n + 4 * b * r * (m + n);
    case LOLDU_PATH_MERGED: return 2 * m * n * r + 4 * b * m * n + 2 * b * r * (m + n);
    default: return 2 * m * n * r + 4 * b * m * n + 2 * b * m * n + 2 * m * n * r;
    }
}

/* The cheapest path's FLOPs over the bare layer's (4·B·m·n). */
static double flop_bound(double m, double n, double r, double b) {
    double bound = INFINITY;
    for (int p = 1; p <= 3; p++) {
        double f = step_flops(p, m, n, r, b);
        if (f < bound) bound = f;
    }
    return bound / (4.0 * b * m * n);
}

typedef struct { int m, n, r, b; const char *name; } shape;

static const char *path_name(int p) {
    switch (p) {
    case LOLDU_PATH_AUTO: return "auto";
    case LOLDU_PATH_FACTORED: return "factored";
    case LOLDU_PATH_MERGED: return "merged";
    default: return "merged_wgrad";
    }
}

static const char *backend_name(int b) {
    switch (b) {
    case LOLDU_BACKEND_OPENBLAS: return "openblas";
    case LOLDU_BACKEND_ONEDNN: return "onednn";
    case LOLDU_BACKEND_WIDENED: return "widened";
    default: return "?";
    }
}

static int adapter_backend(const loldu_adapter *a) {
    loldu_adapter_info info;
    CHECK(loldu_adapter_get_info(a, &info, sizeof info));
    return info.backend;
}

/* Bytes the C heap holds (small blocks and mmap'd ones). */
static double heap_bytes(void) {
    struct mallinfo2 mi = mallinfo2();
    return (double)mi.uordblks + (double)mi.hblkhd;
}

/* A disabled clone: y = x Wᵀ and dX = dY W exactly, through the adapter's own GEMM library. */
static loldu_adapter *bare_clone(const loldu_adapter *a) {
    loldu_adapter *bare = NULL;
    CHECK(loldu_adapter_clone(&bare, a));
    CHECK(loldu_set_enabled(bare, 0));
    return bare;
}

/* One training step: z changes (as after an optimiser step), forward, backward with dX. */
typedef struct {
    loldu_adapter *adapter;
    float *params;  /* z then σ (parameter type: float for float32 and bfloat16 adapters) */
    int rank, keep_h;
} stepper;

static stepper make_stepper(loldu_adapter *a, int batch) {
    stepper s = {a, NULL, 0, 0};
    loldu_adapter_info info;
    CHECK(loldu_adapter_get_info(a, &info, sizeof info));
    s.rank = (int)info.rank;
    CHECK(loldu_params(a, (void **)&s.params, NULL));
    loldu_path keep;
    CHECK(loldu_plan(a, batch, 1, &keep));
    s.keep_h = keep == LOLDU_PATH_FACTORED;
    return s;
}

static double timed_steps(stepper *s, int step, int inner, int batch, const void *x, const void *dy, void *y, void *dx,
                          float *h) {
    double took = 0;
    for (int i = 0; i < inner; i++) {
        s->params[(step * inner + i) % s->rank] += 1e-4f; /* z changes every step, as in training */
        double t0 = now();
        CHECK(loldu_forward(s->adapter, batch, x, y, s->keep_h ? h : NULL));
        CHECK(loldu_backward(s->adapter, batch, x, dy, dx, s->keep_h ? h : NULL));
        took += now() - t0;
        CHECK(loldu_zero_grad(s->adapter));
    }
    return took;
}

static double timed_step(stepper *s, int step, int batch, const void *x, const void *dy, void *y, void *dx, float *h) {
    return timed_steps(s, step, 1, batch, x, dy, y, dx, h);
}

/* Steps per timed sample so that the bare layer's sample lasts at least ~10 ms: short samples
   on a shared machine are hit whole by a single preemption. */
static int inner_for(double bare_seconds) {
    int inner = (int)ceil(0.010 / (bare_seconds > 1e-6 ? bare_seconds : 1e-6));
    return inner < 1 ? 1 : inner > 50 ? 50 : inner;
}

static shape shapes[] = {
    {768, 768, 768, 4096, "ViT-B q/v, full rank"},
    {768, 768, 64, 4096, "ViT-B q/v, r = 64"},
    {4096, 4096, 64, 256, "LLaMA-7B, r = 64"},
    {384, 1536, 384, 2048, "MiniLM output dense, full rank"},
    {384, 384, 384, 2048, "MiniLM attention, full rank"},
    {1536, 384, 384, 2048, "MiniLM intermediate dense, full rank"},
};
#define NSHAPES ((int)(sizeof shapes / sizeof shapes[0]))
#define MAXREPS 64

/* ---- 1. float32 steps ---------------------------------------------------------------------- */

static void section_steps(int reps, buffer *md, buffer *js, int *all_within, int *all_chosen) {
    put(md, "| shape (m × n, r, B) | bare step (library) | factored | merged | merged_wgrad | auto picks | auto | FLOP bound | auto / bound | fastest | OpenBLAS bare / library bare |\n");
    put(md, "|---|---|---|---|---|---|---|---|---|---|---|\n");
    put(js, "\"shapes\": [");
    *all_within = *all_chosen = 1;
    for (int s = 0; s < NSHAPES; s++) {
        shape sh = shapes[s];
        buffers io = make_buffers(sh.m, sh.n, sh.r, sh.b, 1 + s, 100 + s, 200 + s);
        float *w = io.w, *x = io.x, *dy = io.dy, *y = io.y, *dx = io.dx, *h = io.h;

        loldu_config config;
        CHECK(loldu_config_default(&config));
        config.rank = sh.r;
        loldu_adapter *a = NULL;
        CHECK(loldu_adapter_create(&a, LOLDU_FLOAT32, sh.m, sh.n, w, NULL, &config));
        loldu_adapter *bare = bare_clone(a);
        stepper st = make_stepper(a, sh.b);

        /* Interleaved: each repetition times both bare steps, then every path, back to back, so
           that a slow moment of the machine hits all of them; ratios are per repetition. h is
           kept from forward to backward only where it helps: on the factored path (loldu.h). */
        int order[] = {LOLDU_PATH_FACTORED, LOLDU_PATH_MERGED, LOLDU_PATH_MERGED_WGRAD, LOLDU_PATH_AUTO};
        loldu_path auto_keep;
        CHECK(loldu_plan(a, sh.b, 1, &auto_keep));
        double took[6][MAXREPS];
        for (int rep = -1; rep < reps; rep++) {
            for (int q = 0; q < 6; q++) {
                int p = (q + rep + 1) % 6; /* rotate, so that no contender always runs first */
                double t;
                if (p == 4) { /* OpenBLAS's SGEMMs, outside the library */
                    double t0 = now();
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, sh.b, sh.m, sh.n, 1, x, sh.n, w, sh.n, 0, y, sh.m);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, sh.b, sh.n, sh.m, 1, dy, sh.m, w, sh.n, 0, dx, sh.n);
                    t = now() - t0;
                } else if (p == 5) { /* the bare layer through the library's GEMMs */
                    stepper b = {bare, st.params, st.rank, 0};
                    double t0 = now();
                    CHECK(loldu_forward(b.adapter, sh.b, x, y, NULL));
                    CHECK(loldu_backward(b.adapter, sh.b, x, dy, dx, NULL));
                    t = now() - t0;
                } else {
                    CHECK(loldu_set_path(a, (loldu_path)order[p]));
                    st.keep_h = order[p] == LOLDU_PATH_FACTORED || (order[p] == LOLDU_PATH_AUTO && auto_keep == LOLDU_PATH_FACTORED);
                    t = timed_step(&st, rep + 1, sh.b, x, dy, y, dx, h);
                }
                if (rep >= 0) took[p][rep] = t;
            }
        }
        double bare_time = median(took[5], reps), ratios[4];
        for (int p = 0; p < 4; p++) ratios[p] = median_ratio(took[p], took[5], reps);
        double openblas = median_ratio(took[4], took[5], reps);

        loldu_path chosen;
        CHECK(loldu_set_path(a, LOLDU_PATH_AUTO));
        CHECK(loldu_plan(a, sh.b, auto_keep == LOLDU_PATH_FACTORED, &chosen));
        int fastest = 0;
        for (int p = 1; p < 3; p++) if (ratios[p] < ratios[fastest]) fastest = p;
        double bound = flop_bound(sh.m, sh.n, sh.r, sh.b);
        double auto_ratio = ratios[3];
        /* the chooser is right if its path is the fastest, or within 3 % of it (timing noise) */
        int chosen_ok = ratios[chosen - 1] <= 1.03 * ratios[fastest];
        int within = auto_ratio <= 1.10 * bound;
        *all_within &= within;
        *all_chosen &= chosen_ok;
        put(md, "| %d × %d, r = %d, B = %d (%s) | %.1f ms | %.3f× | %.3f× | %.3f× | %s%s | %.3f× | %.3f× | %.3f%s | %s | %.2f× |\n",
            sh.m, sh.n, sh.r, sh.b, sh.name, 1e3 * bare_time, ratios[0], ratios[1], ratios[2],
            path_name(chosen), chosen_ok ? "" : " (not fastest)", auto_ratio, bound,
            auto_ratio / bound, within ? "" : " (over 1.10)", path_name(order[fastest]), openblas);
        put(js, "%s{\"m\": %d, \"n\": %d, \"r\": %d, \"b\": %d, \"bare_ms\": %.4f, \"openblas_bare_ms\": %.4f, "
                "\"factored\": %.4f, \"merged\": %.4f, \"merged_wgrad\": %.4f, \"auto\": %.4f, \"auto_path\": \"%s\", "
                "\"bound\": %.4f, \"auto_ms\": %.4f, \"openblas_over_bare\": %.4f}",
            s ? ", " : "", sh.m, sh.n, sh.r, sh.b, 1e3 * bare_time, 1e3 * median(took[4], reps), ratios[0], ratios[1],
            ratios[2], auto_ratio, path_name(chosen), bound, 1e3 * median(took[3], reps), openblas);
        fprintf(stderr, "steps: shape %d done\n", s);
        loldu_adapter_free(bare);
        loldu_adapter_free(a);
        free_buffers(io);
    }
    put(js, "], ");
}

/* ---- 2. initialisation --------------------------------------------------------------------- */

static void section_init(int quick, buffer *md, buffer *js) {
    const int im = 4096, in = 4096, ir = 64;
    float *w = random_matrix((long)im * in, 7, 0.1f);
    float *colmajor = checked_malloc(sizeof(float) * (size_t)im * in);
    int *ipiv = checked_malloc(sizeof(int) * (size_t)im);
    double init_copy[16], init_borrow[16], init_full[16], init_memcpy[16];
    const int init_reps = quick ? 1 : 9;
    for (int rep = 0; rep < init_reps; rep++) {
        for (int borrow = 0; borrow <= 1; borrow++) {
            loldu_config config;
            CHECK(loldu_config_default(&config));
            config.rank = ir;
            config.borrow_weight = borrow;
            loldu_adapter *a = NULL;
            double t0 = now();
            CHECK(loldu_adapter_create(&a, LOLDU_FLOAT32, im, in, w, NULL, &config));
            (borrow ? init_borrow : init_copy)[rep] = now() - t0;
            loldu_adapter_free(a);
        }
        double t0 = now();
        for (int i = 0; i < im; i++)
            for (int j = 0; j < in; j++) colmajor[i + (long)j * im] = w[(long)i * in + j];
        if (LAPACKE_sgetrf_work(LAPACK_COL_MAJOR, im, in, colmajor, im, ipiv) < 0) exit(1);
        init_full[rep] = now() - t0;
    }
    /* The floor of any initialisation that keeps its own W: one copy into fresh memory. */
    for (int rep = 0; rep < init_reps; rep++) {
        double t0 = now();
        float *fresh = checked_malloc(sizeof(float) * (size_t)im * in);
        memcpy(fresh, w, sizeof(float) * (size_t)im * in);
        init_memcpy[rep] = now() - t0;
        volatile float keep = fresh[(size_t)rep * 4099 % ((size_t)im * in)]; /* the copy is used */
        (void)keep;
        free(fresh);
    }
    double copy = median(init_copy, init_reps), borrowed = median(init_borrow, init_reps);
    double floor_copy = median(init_memcpy, init_reps), full = median(init_full, init_reps);
    put(md, "## Initialisation, 4096 × 4096, r = 64\n\n"
            "Full LU: a column-major copy of W and LAPACK's `sgetrf`, O(mn·min(m, n)). Ours:\n"
            "`loldu_adapter_create`, a panel LU of the first r columns and one triangular solve,\n"
            "O((m + n) r²), plus one pass over W to check it is finite (and to copy it, unless borrowed) and one to fingerprint it (what loading a checkpoint compares).\n\n"
            "| full LU | ours, W copied (default) | speed-up | ours, W borrowed | speed-up | `malloc` + `memcpy` of W |\n"
            "|---|---|---|---|---|---|\n| %.1f ms | %.1f ms | %.0f× | %.1f ms | %.0f× | %.1f ms |\n\n"
            "Target: at least 20× faster: **%s** with the copy of W, **%s** with W borrowed. The last\n"
            "column is the floor for any initialisation that keeps its own copy of W: a plain copy into\n"
            "fresh memory, page faults included, measured in the same run.\n\n",
        1e3 * full, 1e3 * copy, full / copy, 1e3 * borrowed, full / borrowed, 1e3 * floor_copy,
        full / copy >= 20 ? "met" : "missed", full / borrowed >= 20 ? "met" : "missed");
    put(js, "\"init\": {\"m\": %d, \"n\": %d, \"r\": %d, \"full_ms\": %.3f, \"copy_ms\": %.3f, \"borrow_ms\": %.3f, "
            "\"memcpy_ms\": %.3f}, ", im, in, ir, 1e3 * full, 1e3 * copy, 1e3 * borrowed, 1e3 * floor_copy);
    free(w); free(colmajor); free(ipiv);
}

/* ---- 3. bfloat16 steps --------------------------------------------------------------------- */

enum { F32_BARE, F32_STEP, BF_BARE, BF_AUTO, BF_FACTORED, BF_MERGED, BF_WGRAD, WIDE_BARE, WIDE_STEP, NBF };

static void section_bf16(int reps, buffer *md, buffer *js) {
    loldu_backend f32_backend, bf_backend;
    const char *f32_text = "", *bf_text = "";
    CHECK(loldu_gemm_backend(LOLDU_FLOAT32, &f32_backend, &f32_text));
    CHECK(loldu_gemm_backend(LOLDU_BFLOAT16, &bf_backend, &bf_text));
    put(md, "## bfloat16 training steps\n\n"
            "Dispatch (`loldu_gemm_backend`): float32 → **%s**, bfloat16 → **%s** (%s). Forward + backward\n"
            "with dX, z changing before every step. Each figure is a median over %d interleaved repetitions\n"
            "of per-repetition ratios (each sample a block of steps lasting at least ~10 ms for the bare layer). *bare bf16* is a disabled bf16 adapter (exactly `x Wᵀ` and `dY W`,\n"
            "rounded to bf16, through the same GEMM library as our bf16 step); *bare f32* likewise in float32.\n"
            "*widened* is the same bf16 adapter created after `loldu_set_widened_half(1)`: bf16 storage,\n"
            "operands widened to float32 for every GEMM. *Precision*: relative errors (Frobenius) against a\n"
            "float32 adapter on the same bf16 values (same factors), z = D_r ⊙ (1 + e ξ), ξ uniform in\n"
            "[−1, 1), σ = 1, e such that ‖W_eff − W‖ / ‖W‖ = 20% (LoLDU's move on every linear layer in\n"
            "docs/results.md): y on the merged path (W_eff built from bf16 operands), the same with W_eff from\n"
            "float32 operands (as `loldu_merge` builds it), on the factored path and with float32 operands\n"
            "throughout, rounded once (the widened adapter); dz on merged_wgrad and factored.\n\n",
        backend_name(f32_backend), backend_name(bf_backend), bf_text, reps);
    put(md, "| shape (m × n, r, B) | bare bf16 | bare bf16 / bare f32 | bf16 step: auto picks | bf16 step / bare bf16 | FLOP bound | step / bound | factored | merged | merged_wgrad | f32 step / bf16 step | widened bf16 step / bf16 step | widened bare / bare bf16 | y error: merged | merged, W_eff from float32 | factored | widened | dz error: merged_wgrad | factored |\n");
    put(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    put(js, "\"bf16\": {\"f32_backend\": \"%s\", \"bf16_backend\": \"%s\", \"description\": \"%s\", \"shapes\": [",
        backend_name(f32_backend), backend_name(bf_backend), bf_text);
    for (int s = 0; s < NSHAPES; s++) {
        shape sh = shapes[s];
        long mn = (long)sh.m * sh.n;
        buffers io = make_buffers(sh.m, sh.n, sh.r, sh.b, 1 + s, 100 + s, 200 + s);
        float *w = io.w, *x = io.x, *dy = io.dy, *y = io.y, *dx = io.dx, *h = io.h;
        uint16_t *wb = to_bf16(w, mn), *xb = to_bf16(x, (long)sh.b * sh.n), *dyb = to_bf16(dy, (long)sh.b * sh.m);
        uint16_t *yb = checked_malloc(sizeof(uint16_t) * (size_t)sh.b * sh.m);
        uint16_t *dxb = checked_malloc(sizeof(uint16_t) * (size_t)sh.b * sh.n);

        loldu_config config;
        CHECK(loldu_config_default(&config));
        config.rank = sh.r;
        loldu_adapter *f32 = NULL, *bf = NULL, *wide = NULL;
        CHECK(loldu_adapter_create(&f32, LOLDU_FLOAT32, sh.m, sh.n, w, NULL, &config));
        CHECK(loldu_adapter_create(&bf, LOLDU_BFLOAT16, sh.m, sh.n, wb, NULL, &config));
        CHECK(loldu_set_widened_half(1));
        CHECK(loldu_adapter_create(&wide, LOLDU_BFLOAT16, sh.m, sh.n, wb, NULL, &config));
        CHECK(loldu_set_widened_half(0));
        loldu_adapter *f32_bare = bare_clone(f32), *bf_bare = bare_clone(bf), *wide_bare = bare_clone(wide);
        int bf_backend_used = adapter_backend(bf), wide_backend_used = adapter_backend(wide);
        loldu_adapter *bf_paths[3] = {NULL, NULL, NULL};
        for (int p = 0; p < 3; p++) {
            CHECK(loldu_adapter_clone(&bf_paths[p], bf));
            CHECK(loldu_set_path(bf_paths[p], (loldu_path)(LOLDU_PATH_FACTORED + p)));
        }
        stepper st[NBF];
        st[F32_BARE] = make_stepper(f32_bare, sh.b);
        st[F32_STEP] = make_stepper(f32, sh.b);
        st[BF_BARE] = make_stepper(bf_bare, sh.b);
        st[BF_AUTO] = make_stepper(bf, sh.b);
        for (int p = 0; p < 3; p++) st[BF_FACTORED + p] = make_stepper(bf_paths[p], sh.b);
        st[WIDE_BARE] = make_stepper(wide_bare, sh.b);
        st[WIDE_STEP] = make_stepper(wide, sh.b);
        st[F32_BARE].keep_h = st[BF_BARE].keep_h = st[WIDE_BARE].keep_h = 0;
        loldu_path chosen;
        CHECK(loldu_plan(bf, sh.b, st[BF_AUTO].keep_h, &chosen));

        double took[NBF][MAXREPS];
        timed_step(&st[BF_BARE], 0, sh.b, xb, dyb, yb, dxb, h);
        int inner = inner_for(timed_step(&st[BF_BARE], 0, sh.b, xb, dyb, yb, dxb, h));
        for (int rep = -1; rep < reps; rep++) {
            for (int q = 0; q < NBF; q++) {
                int c = (q + rep + 1) % NBF;
                int f32_kind = c == F32_BARE || c == F32_STEP;
                double t = timed_steps(&st[c], rep + 1, inner, sh.b, f32_kind ? (void *)x : (void *)xb,
                                       f32_kind ? (void *)dy : (void *)dyb, f32_kind ? (void *)y : (void *)yb,
                                       f32_kind ? (void *)dx : (void *)dxb, h) / inner;
                if (rep >= 0) took[c][rep] = t;
            }
        }
        double bound = flop_bound(sh.m, sh.n, sh.r, sh.b);
        double step_bare = median_ratio(took[BF_AUTO], took[BF_BARE], reps);
        double speedup = median_ratio(took[F32_STEP], took[BF_AUTO], reps);
        double bare_speed = median_ratio(took[BF_BARE], took[F32_BARE], reps);
        double widened = median_ratio(took[WIDE_STEP], took[BF_AUTO], reps);
        double widened_bare = median_ratio(took[WIDE_BARE], took[BF_BARE], reps);
        double paths[3];
        for (int p = 0; p < 3; p++) paths[p] = median_ratio(took[BF_FACTORED + p], took[BF_BARE], reps);
        bf16_precision prec = measure_bf16_precision(bf_paths[1], bf_paths[2], bf_paths[0], wide, wb, xb, dyb, sh.m, sh.n,
                                                     sh.r, sh.b);
        put(md, "| %d × %d, r = %d, B = %d (%s) | %.1f ms | %.3f× | %s | %.3f× | %.3f× | %.3f%s | %.3f× | %.3f× | %.3f× | **%.2f×** | %.2f× | %.2f× | %.2e | %.2e | %.2e | %.2e | %.2e | %.2e |\n",
            sh.m, sh.n, sh.r, sh.b, sh.name, 1e3 * median(took[BF_BARE], reps), bare_speed, path_name(chosen),
            step_bare, bound, step_bare / bound, step_bare <= 1.10 * bound ? "" : " (over 1.10)", paths[0], paths[1],
            paths[2], speedup, widened, widened_bare, prec.y_merged, prec.y_merged_exact, prec.y_factored, prec.y_wide,
            prec.dz_wgrad, prec.dz_factored);
        put(js, "%s{\"m\": %d, \"n\": %d, \"r\": %d, \"b\": %d, \"bare_bf16_ms\": %.4f, \"bare_f32_ms\": %.4f, "
                "\"bf16_step_ms\": %.4f, \"f32_step_ms\": %.4f, \"widened_step_ms\": %.4f, \"bare_bf16_over_bare_f32\": %.4f, "
                "\"auto_path\": \"%s\", \"step_over_bare\": %.4f, \"bound\": %.4f, \"factored\": %.4f, \"merged\": %.4f, "
                "\"merged_wgrad\": %.4f, \"f32_over_bf16\": %.4f, \"widened_over_bf16\": %.4f, \"widened_bare_over_bare\": %.4f, "
                "\"backend\": \"%s\", \"widened_backend\": \"%s\", \"y_error_merged\": %.4g, \"y_error_merged_exact\": %.4g, \"y_error_factored\": %.4g, "
                "\"y_error_widened\": %.4g, \"dz_error_merged_wgrad\": %.4g, \"dz_error_factored\": %.4g}",
            s ? ", " : "", sh.m, sh.n, sh.r, sh.b, 1e3 * median(took[BF_BARE], reps), 1e3 * median(took[F32_BARE], reps),
            1e3 * median(took[BF_AUTO], reps), 1e3 * median(took[F32_STEP], reps), 1e3 * median(took[WIDE_STEP], reps),
            bare_speed, path_name(chosen), step_bare, bound, paths[0], paths[1], paths[2], speedup, widened,
            widened_bare, backend_name(bf_backend_used), backend_name(wide_backend_used), prec.y_merged, prec.y_merged_exact, prec.y_factored,
            prec.y_wide, prec.dz_wgrad, prec.dz_factored);
        fprintf(stderr, "bf16: shape %d done\n", s);
        for (int p = 0; p < 3; p++) loldu_adapter_free(bf_paths[p]);
        loldu_adapter_free(f32_bare); loldu_adapter_free(bf_bare); loldu_adapter_free(wide_bare);
        loldu_adapter_free(f32); loldu_adapter_free(bf); loldu_adapter_free(wide);
        free_buffers(io);
        free(wb); free(xb); free(dyb); free(yb); free(dxb);
    }
    put(js, "]}, ");
    put(md, "\n");
}

/* ---- 4. many adapters on one base ---------------------------------------------------------- */

#define MAX_ADAPTERS 4096
static const int group_counts[] = {1, 16, 256, 4096};
#define NCOUNTS 4

/* rows[b] for N adapters: round-robin spreads the batch evenly over the list (every row its own
   adapter once N ≥ B: rows b·(N/B)), random draws uniformly from the N. */
static void assign_rows(int32_t *rows, int batch, int count, int random, unsigned seed) {
    unsigned long long s = seed * 0x9E3779B97F4A7C15ull + 7;
    int stride = count > batch ? count / batch : 1;
    for (int b = 0; b < batch; b++) {
        if (random) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            rows[b] = (int32_t)((s >> 33) % (unsigned long long)count);
        } else {
            rows[b] = (int32_t)(((long)b * stride) % count);
        }
    }
}

static int distinct(const int32_t *rows, int batch, int count) {
    char *seen = calloc((size_t)count, 1);
    int d = 0;
    for (int b = 0; b < batch; b++) if (!seen[rows[b]]) { seen[rows[b]] = 1; d++; }
    free(seen);
    return d;
}

typedef struct { int m, n, r, b; const char *name; } group_shape;
static const group_shape group_shapes[] = {
    {384, 384, 384, 256, "MiniLM attention, full rank"},
    {4096, 4096, 64, 256, "LLaMA-7B, r = 64"},
};
#define NGROUP ((int)(sizeof group_shapes / sizeof group_shapes[0]))

static void section_grouped(int reps, buffer *md, buffer *js) {
    put(md, "## Many adapters on one base (float32)\n\n"
            "A batch of B = 256 rows whose rows belong to N adapters derived from one base\n"
            "(`loldu_adapter_derive`, each with its own z: `LOLDU_INIT_NORMAL` with its own seed), through\n"
            "`loldu_grouped_forward` and `loldu_grouped_forward` + `loldu_grouped_backward` (with dX),\n"
            "as a ratio to N = 1 through the same calls (medians over %d interleaved repetitions of\n"
            "per-repetition ratios; each sample a block of calls lasting at least ~10 ms). Rows are assigned round-robin (row b → adapter b·⌈N/B⌉ mod N: every row\n"
            "its own adapter once N ≥ B) or uniformly at random (fixed seed); with B = 256, a batch uses at\n"
            "most 256 of the N adapters (*used*). *One adapter alone* is N = 1 through that adapter's own\n"
            "`loldu_forward` (and `loldu_backward`) on its fastest path, for reference: forward with z\n"
            "unchanged (serving, so the merged path reuses its cached W_eff), training steps with z changing.\n\n",
        reps);
    put(js, "\"grouped\": [");
    for (int gs = 0; gs < NGROUP; gs++) {
        group_shape sh = group_shapes[gs];
        buffers io = make_buffers(sh.m, sh.n, sh.r, sh.b, 11 + gs, 300 + gs, 400 + gs);
        float *w = io.w, *x = io.x, *dy = io.dy, *y = io.y, *dx = io.dx, *h = io.h;
        loldu_config config;
        CHECK(loldu_config_default(&config));
        config.rank = sh.r;
        loldu_adapter *base = NULL;
        CHECK(loldu_adapter_create(&base, LOLDU_FLOAT32, sh.m, sh.n, w, NULL, &config));

        /* Memory per derived adapter: heap in use before and after deriving 4096 of them. */
        loldu_adapter **list = checked_malloc(sizeof(loldu_adapter *) * MAX_ADAPTERS);
        malloc_trim(0);
        double heap0 = heap_bytes();
        for (int i = 0; i < MAX_ADAPTERS; i++) {
            loldu_config c = config;
            c.z_init = LOLDU_INIT_NORMAL;
            c.seed = (uint64_t)i + 1;
            CHECK(loldu_adapter_derive(&list[i], base, &c));
        }
        double heap1 = heap_bytes();
        for (int i = 0; i < MAX_ADAPTERS; i++) {
            void *g = NULL;
            CHECK(loldu_params(list[i], NULL, &g)); /* gradients, allocated on first use */
        }
        double heap2 = heap_bytes();
        loldu_optimizer_config oc;
        CHECK(loldu_optimizer_config_default(&oc, LOLDU_ADAM));
        loldu_optimizer *opt = NULL;
        CHECK(loldu_optimizer_create(&opt, &oc, list, MAX_ADAPTERS));
        double heap3 = heap_bytes();
        CHECK(loldu_optimizer_step(opt, NULL));
        double heap4 = heap_bytes();
        double per_params = (heap1 - heap0) / MAX_ADAPTERS, per_grads = (heap2 - heap1) / MAX_ADAPTERS;
        double per_opt_create = (heap3 - heap2) / MAX_ADAPTERS, per_opt_step = (heap4 - heap3) / MAX_ADAPTERS;
        double allowance = 4.0 * (sh.r + 1) + 256;
        put(js, "%s{\"m\": %d, \"n\": %d, \"r\": %d, \"b\": %d, \"memory\": {\"adapters\": %d, \"per_adapter\": %.1f, "
                "\"per_adapter_grads\": %.1f, \"per_adapter_optimizer_create\": %.1f, \"per_adapter_optimizer_step\": %.1f, "
                "\"allowance\": %.1f}, ",
            gs ? ", " : "", sh.m, sh.n, sh.r, sh.b, MAX_ADAPTERS, per_params, per_grads, per_opt_create, per_opt_step,
            allowance);

        /* Timing. Contenders: grouped forward and forward + backward for each N and assignment
           (N = 1 once), then one adapter alone on each path. */
        int32_t *rows[2][NCOUNTS];
        int used[2][NCOUNTS];
        for (int mode = 0; mode < 2; mode++)
            for (int k = 0; k < NCOUNTS; k++) {
                rows[mode][k] = checked_malloc(sizeof(int32_t) * (size_t)sh.b);
                assign_rows(rows[mode][k], sh.b, group_counts[k], mode, 17u + (unsigned)k);
                used[mode][k] = distinct(rows[mode][k], sh.b, group_counts[k]);
            }
        enum { G_FWD = 0, G_STEP = 7, S_FWD_FACT = 14, S_FWD_MERGED, S_STEP_FACT, S_STEP_MERGED, S_STEP_WGRAD, NG };
        /* index within G_FWD / G_STEP: 0 = N 1, 1..3 = round-robin N 16/256/4096, 4..6 = random */
        loldu_adapter *alone[5];
        stepper alone_step[5];
        for (int p = 0; p < 5; p++) {
            CHECK(loldu_adapter_clone(&alone[p], list[0]));
            int path = p < 2 ? (p == 0 ? LOLDU_PATH_FACTORED : LOLDU_PATH_MERGED) : LOLDU_PATH_FACTORED + (p - 2);
            CHECK(loldu_set_path(alone[p], (loldu_path)path));
            alone_step[p] = make_stepper(alone[p], sh.b);
            if (p < 2) alone_step[p].keep_h = 0;
        }
        double took[NG][MAXREPS];
        double t1 = now();
        CHECK(loldu_grouped_forward(list, 1, sh.b, rows[0][0], x, y));
        CHECK(loldu_grouped_forward(list, 1, sh.b, rows[0][0], x, y));
        int inner = inner_for((now() - t1) / 2);
        for (int rep = -1; rep < reps; rep++) {
            for (int q = 0; q < NG; q++) {
                int c = (q + rep + 1) % NG;
                double t;
                if (c < S_FWD_FACT) {
                    int fwd_only = c < G_STEP, i = c % 7;
                    int k = i == 0 ? 0 : (i - 1) % 3 + 1, mode = i >= 4;
                    double t0 = now();
                    for (int j = 0; j < inner; j++) {
                        CHECK(loldu_grouped_forward(list, (size_t)group_counts[k], sh.b, rows[mode][k], x, y));
                        if (!fwd_only)
                            CHECK(loldu_grouped_backward(list, (size_t)group_counts[k], sh.b, rows[mode][k], x, dy, dx));
                    }
                    t = (now() - t0) / inner;
                } else if (c <= S_FWD_MERGED) {
                    loldu_adapter *a = alone[c - S_FWD_FACT];
                    double t0 = now();
                    for (int j = 0; j < inner; j++) CHECK(loldu_forward(a, sh.b, x, y, NULL));
                    t = (now() - t0) / inner;
                } else {
                    t = timed_steps(&alone_step[c - S_FWD_FACT], rep + 1, inner, sh.b, x, dy, y, dx, h) / inner;
                }
                if (rep >= 0) took[c][rep] = t;
            }
        }
        const char *label[2] = {"round-robin", "random"};
        double fwd1 = median(took[G_FWD], reps), step1 = median(took[G_STEP], reps);
        double alone_fwd = fmin(median(took[S_FWD_FACT], reps), median(took[S_FWD_MERGED], reps));
        int alone_fwd_path = median(took[S_FWD_FACT], reps) <= median(took[S_FWD_MERGED], reps) ? LOLDU_PATH_FACTORED : LOLDU_PATH_MERGED;
        double alone_step_best = INFINITY;
        int alone_step_path = LOLDU_PATH_FACTORED;
        for (int p = 0; p < 3; p++) {
            double t = median(took[S_STEP_FACT + p], reps);
            if (t < alone_step_best) { alone_step_best = t; alone_step_path = LOLDU_PATH_FACTORED + p; }
        }
        double alone_fwd_ratio = median_ratio(alone_fwd_path == LOLDU_PATH_FACTORED ? took[S_FWD_FACT] : took[S_FWD_MERGED], took[G_FWD], reps);
        double alone_step_ratio = median_ratio(took[S_STEP_FACT + alone_step_path - 1], took[G_STEP], reps);

        put(md, "### %d × %d, r = %d, B = %d (%s)\n\n", sh.m, sh.n, sh.r, sh.b, sh.name);
        put(md, "| rows | N | used | forward / N = 1 | forward + backward / N = 1 |\n|---|---|---|---|---|\n");
        put(md, "| — | 1 | 1 | 1 (%.2f ms) | 1 (%.2f ms) |\n", 1e3 * fwd1, 1e3 * step1);
        put(js, "\"n1_forward_ms\": %.4f, \"n1_step_ms\": %.4f, \"rows\": [", 1e3 * fwd1, 1e3 * step1);
        int within = 1;
        double worst = 0;
        for (int mode = 0; mode < 2; mode++)
            for (int k = 1; k < NCOUNTS; k++) {
                int i = 1 + mode * 3 + (k - 1);
                double rf = median_ratio(took[G_FWD + i], took[G_FWD], reps);
                double rs = median_ratio(took[G_STEP + i], took[G_STEP], reps);
                if (group_counts[k] == 4096) { within &= rf <= 1.10 && rs <= 1.10; worst = fmax(worst, fmax(rf, rs)); }
                put(md, "| %s | %d | %d | %.3f× | %.3f× |\n", label[mode], group_counts[k], used[mode][k], rf, rs);
                put(js, "%s{\"assign\": \"%s\", \"n\": %d, \"used\": %d, \"forward\": %.4f, \"step\": %.4f}",
                    mode + k > 1 ? ", " : "", label[mode], group_counts[k], used[mode][k], rf, rs);
            }
        /* round-robin N = 256 (index 2 of the round-robin block): 256 adapters used */
        double extra_f = mdiff(took[G_FWD + 2], took[G_FWD], reps) / used[0][2];
        double extra_s = mdiff(took[G_STEP + 2], took[G_STEP], reps) / used[0][2];
        put(md, "| extra time per used adapter (round-robin N = 256 minus N = 1, over 256) | | | %.2f µs | %.2f µs |\n",
            1e6 * extra_f, 1e6 * extra_s);
        put(md, "| one adapter alone | 1 | 1 | %.3f× (%s, %.2f ms) | %.3f× (%s, %.2f ms) |\n\n",
            alone_fwd_ratio, path_name(alone_fwd_path), 1e3 * alone_fwd, alone_step_ratio, path_name(alone_step_path),
            1e3 * alone_step_best);
        put(md, "Target: N = 4,096 within 1.10× of N = 1: **%s** (worst %.3f×).\n\n", within ? "met" : "missed", worst);
        put(md, "Memory per added adapter: heap in use (`mallinfo2`, `uordblks + hblkhd`) before and after each stage,\n"
                "divided by the %d adapters of rank %d:\n\n"
                "| stage | bytes per adapter |\n|---|---|\n"
                "| `loldu_adapter_derive` (z, σ, handle and bookkeeping) | **%.0f** (allowance 4·(r + 1) + 256 = %.0f: **%s**) |\n"
                "| gradient buffers, allocated on first use (`loldu_params` / first backward) | %.0f |\n"
                "| optimiser state: `loldu_optimizer_create` (Adam) over the %d | %.0f |\n"
                "| optimiser state: its first `loldu_optimizer_step` | %.0f |\n\n",
            MAX_ADAPTERS, sh.r, per_params, allowance, per_params <= allowance ? "met" : "missed", per_grads,
            MAX_ADAPTERS, per_opt_create, per_opt_step);
        put(js, "], \"alone_forward\": %.4f, \"alone_forward_path\": \"%s\", \"alone_forward_ms\": %.4f, "
                "\"alone_step\": %.4f, \"alone_step_path\": \"%s\", \"alone_step_ms\": %.4f, \"within\": %s, "
                "\"extra_us_per_adapter_forward\": %.9g, \"extra_us_per_adapter_step\": %.9g}",  /* (full precision: the report rounds once) */
            alone_fwd_ratio, path_name(alone_fwd_path), 1e3 * alone_fwd, alone_step_ratio, path_name(alone_step_path),
            1e3 * alone_step_best, within ? "true" : "false", 1e6 * extra_f, 1e6 * extra_s);
        fprintf(stderr, "grouped: shape %d done\n", gs);
        for (int p = 0; p < 5; p++) loldu_adapter_free(alone[p]);
        for (int mode = 0; mode < 2; mode++) for (int k = 0; k < NCOUNTS; k++) free(rows[mode][k]);
        loldu_optimizer_free(opt);
        for (int i = 0; i < MAX_ADAPTERS; i++) loldu_adapter_free(list[i]);
        free(list);
        loldu_adapter_free(base);
        free_buffers(io);
    }
    put(js, "], ");
}

/* ---- 5. adding a saved adapter to a loaded base -------------------------------------------- */

static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[4096];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
}

#define NLOAD 5 /* the timed calls of adding an adapter: open, layer, derive, apply, free */

static void section_load(int reps, buffer *md, buffer *js) {
    put(md, "## Adding a saved adapter to a loaded base\n\n"
            "`loldu_checkpoint_open` + `loldu_checkpoint_layer` + `loldu_adapter_derive` + `loldu_checkpoint_apply`\n"
            "(+ `loldu_checkpoint_free`) for a one-layer checkpoint saved from an adapter on the same base, so\n"
            "nothing is amortised over layers. *First* is the first adapter added to a freshly created base\n"
            "(whatever the library computes once per base on first use falls on it); *later* is the next\n"
            "adapter on that base. *Base creation* is the `loldu_adapter_create` of that base, timed in the same\n"
            "repetitions (work moved out of the first adapter into creation shows there). Medians over %d\n"
            "repetitions, each on a new base.\n\n"
            "| base (m × n, r) | base creation | adapter | total | open | layer | derive | apply | free |\n"
            "|---|---|---|---|---|---|---|---|---|\n", reps);
    put(js, "\"load\": [");
    const char *part_name[NLOAD] = {"open_ms", "layer_ms", "derive_ms", "apply_ms", "free_ms"};
    for (int gs = 0; gs < NGROUP; gs++) {
        group_shape sh = group_shapes[gs];
        float *w = random_matrix((long)sh.m * sh.n, 11 + gs, 0.1f);
        loldu_config config;
        CHECK(loldu_config_default(&config));
        config.rank = sh.r;
        char dir[] = "/tmp/loldu-bench-XXXXXX";
        if (!mkdtemp(dir)) { perror("mkdtemp"); exit(1); }
        const char *name = "encoder.layer.0.attention.self.query";
        {
            loldu_adapter *base = NULL, *saved = NULL;
            CHECK(loldu_adapter_create(&base, LOLDU_FLOAT32, sh.m, sh.n, w, NULL, &config));
            loldu_config c = config;
            c.z_init = LOLDU_INIT_NORMAL;
            c.seed = 5;
            CHECK(loldu_adapter_derive(&saved, base, &c));
            CHECK(loldu_checkpoint_save(dir, &saved, &name, 1));
            loldu_adapter_free(saved);
            loldu_adapter_free(base);
        }
        /* [k][rep]: k = 0 the first adapter on the base, 1 the next; part[k][p][rep] its calls */
        double create[MAXREPS], total[2][MAXREPS], part[2][NLOAD][MAXREPS];
        for (int rep = -1; rep < reps; rep++) {
            loldu_adapter *base = NULL;
            double t0 = now();
            CHECK(loldu_adapter_create(&base, LOLDU_FLOAT32, sh.m, sh.n, w, NULL, &config));
            if (rep >= 0) create[rep] = now() - t0;
            for (int k = 0; k < 2; k++) {
                double t[NLOAD + 1];
                loldu_checkpoint *ck = NULL;
                loldu_adapter *a = NULL;
                loldu_config lc;
                CHECK(loldu_config_default(&lc));
                t[0] = now();
                CHECK(loldu_checkpoint_open(&ck, dir));
                t[1] = now();
                CHECK(loldu_checkpoint_layer(ck, name, NULL, NULL, NULL, &lc));
                t[2] = now();
                CHECK(loldu_adapter_derive(&a, base, &lc));
                t[3] = now();
                CHECK(loldu_checkpoint_apply(ck, name, a));
                t[4] = now();
                loldu_checkpoint_free(ck);
                t[5] = now();
                loldu_adapter_free(a);
                if (rep < 0) continue;
                total[k][rep] = t[NLOAD] - t[0];
                for (int p = 0; p < NLOAD; p++) part[k][p][rep] = t[p + 1] - t[p];
            }
            loldu_adapter_free(base);
        }
        remove_dir(dir);
        double created = median(create, reps);
        put(js, "%s{\"m\": %d, \"n\": %d, \"r\": %d, \"create_ms\": %.4f, \"first_ms\": %.4f, \"later_ms\": %.4f",
            gs ? ", " : "", sh.m, sh.n, sh.r, 1e3 * created, 1e3 * median(total[0], reps), 1e3 * median(total[1], reps));
        for (int k = 0; k < 2; k++) {
            if (k) put(md, "| | | later |");
            else put(md, "| %d × %d, r = %d | %.3f ms | first |", sh.m, sh.n, sh.r, 1e3 * created);
            put(md, " **%.3f ms** |", 1e3 * median(total[k], reps));
            put(js, ", \"%s\": {", k ? "later" : "first");
            for (int p = 0; p < NLOAD; p++) {
                put(md, " %.3f ms |", 1e3 * median(part[k][p], reps));
                put(js, "%s\"%s\": %.4f", p ? ", " : "", part_name[p], 1e3 * median(part[k][p], reps));
            }
            put(md, "\n");
            put(js, "}");
        }
        put(js, "}");
        fprintf(stderr, "load: shape %d done\n", gs);
        free(w);
    }
    put(js, "], ");
    put(md, "\n");
}

/* The shape lists, for the Python benchmark (one list for both). */
static void put_shape_lists(buffer *js) {
    put(js, "\"shape_list\": [");
    for (int s = 0; s < NSHAPES; s++)
        put(js, "%s{\"m\": %d, \"n\": %d, \"r\": %d, \"b\": %d, \"name\": \"%s\"}", s ? ", " : "", shapes[s].m,
            shapes[s].n, shapes[s].r, shapes[s].b, shapes[s].name);
    put(js, "], \"group_shapes\": [");
    for (int s = 0; s < NGROUP; s++)
        put(js, "%s{\"m\": %d, \"n\": %d, \"r\": %d, \"b\": %d, \"name\": \"%s\"}", s ? ", " : "", group_shapes[s].m,
            group_shapes[s].n, group_shapes[s].r, group_shapes[s].b, group_shapes[s].name);
    put(js, "], \"group_counts\": [");
    for (int k = 0; k < NCOUNTS; k++) put(js, "%s%d", k ? ", " : "", group_counts[k]);
    put(js, "], ");
}

/* ---- main ---------------------------------------------------------------------------------- */

static int wants(const char *sections, const char *name) {
    if (!sections) return 1;
    size_t len = strlen(name);
    for (const char *p = sections; (p = strstr(p, name)); p += len)
        if ((p == sections || p[-1] == ',') && (p[len] == 0 || p[len] == ',')) return 1;
    return 0;
}

int main(int argc, char **argv) {
    const char *markdown = NULL, *json_path = NULL, *sections = NULL;
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--markdown") && i + 1 < argc) markdown = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
        else if (!strcmp(argv[i], "--sections") && i + 1 < argc) sections = argv[++i];
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: %s [--markdown FILE] [--json FILE] [--quick] [--sections steps,init,bf16,grouped,load]\n", argv[0]);
            return 2;
        }
    }
    const int reps = quick ? 3 : 31, bf16_reps = quick ? 3 : 15, group_reps = quick ? 3 : 15, load_reps = quick ? 3 : 21;

    buffer steps_md = {0}, init_md = {0}, bf16_md = {0}, group_md = {0}, load_md = {0}, js = {0};
    put(&js, "{");
    int all_within = 1, all_chosen = 1;
    if (wants(sections, "steps")) section_steps(reps, &steps_md, &js, &all_within, &all_chosen);
    if (wants(sections, "init")) section_init(quick, &init_md, &js);
    if (wants(sections, "bf16")) section_bf16(bf16_reps, &bf16_md, &js);
    if (wants(sections, "grouped")) section_grouped(group_reps, &group_md, &js);
    if (wants(sections, "load")) section_load(load_reps, &load_md, &js);

    struct utsname u;
    uname(&u);
    char cpu[256] = "unknown";
    long cores = 0;
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[4096];
        while (fgets(line, sizeof line, f)) {
            if (!strncmp(line, "processor", 9)) cores++;
            if (!strncmp(line, "model name", 10) && !strcmp(cpu, "unknown")) {
                char *c = strchr(line, ':');
                if (c) { snprintf(cpu, sizeof cpu, "%s", c + 2); cpu[strcspn(cpu, "\n")] = 0; }
            }
        }
        fclose(f);
    }
    loldu_backend f32_backend;
    const char *f32_text = "";
    CHECK(loldu_gemm_backend(LOLDU_FLOAT32, &f32_backend, &f32_text));

    buffer report = {0};
    put(&report,
        "# Benchmarks\n\n"
        "Produced by `make bench` (`build/bench --markdown FILE --json FILE`), in one process, against\n"
        "baselines measured in the same run. Step ratios are medians over %d interleaved repetitions of\n"
        "per-repetition ratios (the bare step and every path back to back).\n\n"
        "Machine: %s, %ld cores, %s %s. BLAS: %s, core `%s`, %d threads (ours and the baseline alike).\n"
        "libloldu %s; float32 GEMMs: %s (%s).\n\n",
        reps, cpu, cores, u.sysname, u.release, openblas_get_config(), openblas_get_corename(),
        openblas_get_num_threads(), loldu_version_string(), backend_name(f32_backend), f32_text);
    if (steps_md.len)
        put(&report,
            "## One training step\n\n"
            "Forward + backward with dX, as a ratio to the bare frozen layer (`x Wᵀ` and `dY W`) computed by\n"
            "the library itself: a disabled adapter on the same weight, which runs exactly those two products\n"
            "through the same GEMM library as the steps (the library sends float32 to %s here). OpenBLAS's own\n"
            "two SGEMMs are timed in the same repetitions (last column). `z` changes before every step, as in\n"
            "training, so the merged paths rebuild `W_eff` every step. The FLOP bound is the cheapest path's\n"
            "FLOP count over the bare layer's (docs/design.md); the target is auto within 1.10× of it, and the\n"
            "chooser (`auto picks`) choosing the fastest path.\n\n%s\n"
            "Targets: every step within 1.10× of its bound: **%s**; chooser picks the fastest path (within 3%%) on\n"
            "every shape: **%s**.\n\n",
            backend_name(f32_backend), text(&steps_md), all_within ? "met" : "missed", all_chosen ? "met" : "missed");
    put(&report, "%s%s%s%s", text(&init_md), text(&bf16_md), text(&group_md), text(&load_md));
    put_shape_lists(&js);
    put(&js, "\"blas\": \"%s\", \"threads\": %d, \"f32_backend\": \"%s\", \"backend_description\": \"%s\", "
             "\"cpu\": \"%s\", \"steps_within\": %s, \"chooser_right\": %s}\n",
        openblas_get_corename(), openblas_get_num_threads(), backend_name(f32_backend), f32_text, cpu,
        all_within ? "true" : "false", all_chosen ? "true" : "false");
    if (json_path) {
        FILE *out = fopen(json_path, "w");
        if (!out || fputs(text(&js), out) < 0 || fclose(out) != 0) { perror(json_path); return 1; }
    }
    fputs(text(&report), stdout);
    if (markdown) {
        FILE *out = fopen(markdown, "w");
        if (!out || fputs(text(&report), out) < 0 || fclose(out) != 0) { perror(markdown); return 1; }
    }
    return 0;
}
