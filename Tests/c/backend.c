/* Which GEMM library each element type gets, from a clean environment (env -i) and with
 * OpenBLAS forced onto kernels older than the CPU: the rule of loldu_gemm_backend, checked
 * against /proc/cpuinfo and the core OpenBLAS reports in the same process.
 *
 *   backend          run the checks (starts itself as "backend child" in each environment)
 *   backend child    print "core f32 f64 bf16 f16" for this process, then a float32 training
 *                    step's results (sums over y and dX), which must agree whichever library ran
 *   backend threads  threads and fork(): a small product starts no thread, and a child forked
 *                    after products on two threads computes the same (exit status 0 if so)
 *   backend foreign  the same for a child whose parent's OpenMP threads were started by another
 *                    library, before the parent's first product
 */
#define _POSIX_C_SOURCE 200809L
#include <loldu.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

char *openblas_get_corename(void);

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { failures++; fprintf(stderr, "FAIL: " __VA_ARGS__); fputc('\n', stderr); } } while (0)

static int backend_of(loldu_dtype dtype) {
    loldu_backend b;
    if (loldu_gemm_backend(dtype, &b, NULL) != LOLDU_OK) return -1;
    return (int)b;
}

static int cpu_has(const char *flag) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[8192];
    int found = 0;
    while (f && !found && fgets(line, sizeof line, f)) {
        if (strncmp(line, "flags", 5) != 0) continue;
        for (char *word = strtok(line, " \t\n:"); word; word = strtok(NULL, " \t\n:"))
            if (strcmp(word, flag) == 0) found = 1;
    }
    if (f) fclose(f);
    return found;
}

/* Whether `word` is one of the space-separated words of `list`. */
static int in_list(const char *word, const char *list) {
    size_t n = strlen(word);
    for (const char *at = list; (at = strstr(at, word)) != NULL; at += n)
        if ((at == list || at[-1] == ' ') && (at[n] == ' ' || at[n] == 0)) return 1;
    return 0;
}

/* A float32 step on a fixed 64 × 48 layer (rank 16, trained z, 8 rows): the sums of y, of |y|,
   of dX and of |dX|, in double. */
enum { SM = 64, SN = 48, SB = 8 };
static int step_sums(double sums[4]) {
    static float w[SM * SN], x[SB * SN], dy[SB * SM], y[SB * SM], dx[SB * SN], z[16];
    for (int i = 0; i < SM * SN; i++) w[i] = (float)sin(0.37 * i) + (i % (SN + 1) == 0 ? 3.0f : 0.0f);
    for (int i = 0; i < SB * SN; i++) x[i] = (float)cos(0.11 * i);
    for (int i = 0; i < SB * SM; i++) dy[i] = (float)sin(0.23 * i);
    loldu_config c;
    loldu_config_default(&c);
    c.rank = 16;
    loldu_adapter *a = NULL;
    if (loldu_adapter_create(&a, LOLDU_FLOAT32, SM, SN, w, NULL, &c) != LOLDU_OK) return 0;
    int ok = loldu_get_z(a, z) == LOLDU_OK;
    for (int k = 0; k < 16; k++) z[k] *= 1.0f + 0.05f * (float)k;
    ok = ok && loldu_set_z(a, z) == LOLDU_OK && loldu_forward(a, SB, x, y, NULL) == LOLDU_OK
         && loldu_backward(a, SB, x, dy, dx, NULL) == LOLDU_OK;
    loldu_adapter_free(a);
    for (int j = 0; j < 4; j++) sums[j] = 0;
    for (int i = 0; i < SB * SM; i++) { sums[0] += y[i]; sums[1] += fabs(y[i]); }
    for (int i = 0; i < SB * SN; i++) { sums[2] += dx[i]; sums[3] += fabs(dx[i]); }
    return ok;
}

/* The threads of this process. */
static int task_count(void) {
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d)) != NULL;) n += e->d_name[0] != '.';
    if (d) closedir(d);
    return n;
}

/* A forward of `rows` rows through a fresh square float32 layer of size `size` (rank 16). */
static int forward_rows(loldu_adapter **a, int size, int rows, float *y) {
    float *w = malloc(sizeof(float) * (size_t)size * (size_t)size), *x = malloc(sizeof(float) * (size_t)rows * (size_t)size);
    if (!w || !x) { free(w); free(x); return 0; }
    for (int i = 0; i < size * size; i++) w[i] = (float)sin(0.37 * i) + (i % (size + 1) == 0 ? 3.0f : 0.0f);
    for (int i = 0; i < rows * size; i++) x[i] = (float)cos(0.11 * i);
    loldu_config c;
    loldu_config_default(&c);
    c.rank = 16;
    int ok = (*a != NULL || loldu_adapter_create(a, LOLDU_FLOAT32, size, size, w, NULL, &c) == LOLDU_OK)
             && loldu_forward(*a, rows, x, y, NULL) == LOLDU_OK;
    free(w);
    free(x);
    return ok;
}

enum { SMALL = 64, BIG = 256 };

/* Whether a forked child's first products finish within 30 s: a BIG x BIG forward of BIG rows
   through `*big` (a new layer if NULL), equal to `expected` if given, then a small one through
   `*small` (likewise). Says why not on stderr. */
static int child_computes(loldu_adapter **big, loldu_adapter **small, const float *expected) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(30);
        static float y[BIG * BIG];
        int ok = forward_rows(big, BIG, BIG, y);
        for (int i = 0; ok && expected && i < BIG * BIG; i++) ok = fabsf(y[i] - expected[i]) <= 1e-4f * (1.0f + fabsf(expected[i]));
        _exit(ok && forward_rows(small, SMALL, SMALL, y) ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok) fprintf(stderr, "the forked child's products: %s %d\n",
                     WIFSIGNALED(status) ? "killed by signal (SIGALRM: it blocked)" : "exit status",
                     WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    return ok;
}

/* "backend threads": GNU OpenMP (under oneDNN) cannot start threads in a child of fork() once the
   parent started some: a product on two threads there waited for ever. The library runs a forked
   child's oneDNN products on one thread; and a product below 8 MFLOP runs on the calling thread
   alone (oneDNN fixes a primitive's threads when it is created: they are part of its key). */
static int thread_checks(void) {
    alarm(120); /* (a hang ends as a failure) */
    static float y[BIG * BIG];
    loldu_adapter *small = NULL, *big = NULL;
    CHECK(loldu_set_num_threads(2) == LOLDU_OK, "two threads");
    int before = task_count();
    CHECK(forward_rows(&small, SMALL, SMALL, y), "a 64 x 64 forward of 64 rows");
    CHECK(task_count() == before, "a 0.5 MFLOP product started %d threads", task_count() - before);
    CHECK(forward_rows(&big, BIG, BIG, y), "a 256 x 256 forward of 256 rows (two threads)");
    CHECK(child_computes(&big, &small, y), "a child forked after products on two threads computes the same");
    loldu_adapter_free(small);
    loldu_adapter_free(big);
    return failures == 0;
}

static void spin(void *data) { (void)data; }

/* "backend foreign": another library's OpenMP (PyTorch's, say) started two threads before the
   library loaded oneDNN, which then shares that runtime; a child forked after the library chose
   its GEMM library, or only after it set its thread count, computes its first products. */
static int foreign_checks(void) {
    alarm(120);
    void *gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_GLOBAL);
    void (*parallel)(void (*)(void *), void *, unsigned, unsigned) = NULL;
    if (gomp) *(void **)(&parallel) = dlsym(gomp, "GOMP_parallel");
    CHECK(parallel != NULL, "GNU OpenMP's GOMP_parallel");
    if (!parallel) return 0;
    int before = task_count();
    parallel(spin, NULL, 2, 0);
    CHECK(task_count() > before, "the other library's OpenMP started a thread");
    loldu_adapter *big = NULL, *small = NULL; /* (made by each child) */
    CHECK(loldu_set_num_threads(2) == LOLDU_OK, "two threads");
    CHECK(child_computes(&big, &small, NULL), "a child forked after the thread count was set computes");
    loldu_backend b;
    CHECK(loldu_gemm_backend(LOLDU_FLOAT32, &b, NULL) == LOLDU_OK, "the float32 backend");
    CHECK(child_computes(&big, &small, NULL), "a child forked after the GEMM library was chosen computes");
    return failures == 0;
}

/* Starts this program as "backend `mode`" with `env`, its stdout on `out` (unless -1). */
static pid_t start_self(const char *self, const char *mode, char *const env[], int out) {
    pid_t pid = fork();
    if (pid == 0) {
        if (out >= 0) dup2(out, 1);
        char *const args[] = {(char *)self, (char *)mode, NULL};
        execve(self, args, env);
        _exit(127);
    }
    return pid;
}

/* Whether the process `pid` exited with status 0. */
static int exited_ok(pid_t pid) {
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* Runs this program as "backend `mode`" with `env`: whether every check passed. */
static int threads_child(const char *self, const char *mode, char *const env[]) {
    return exited_ok(start_self(self, mode, env, -1));
}

/* Runs this program as a child with `env` and reads its lines. */
static int child(const char *self, char *const env[], char core[64], int b[4], double sums[4]) {
    int fd[2];
    if (pipe(fd) != 0) return 0;
    pid_t pid = start_self(self, "child", env, fd[1]);
    close(fd[1]);
    FILE *out = fdopen(fd[0], "r");
    int n = fscanf(out, "%63s %d %d %d %d %lf %lf %lf %lf", core, &b[0], &b[1], &b[2], &b[3],
                   &sums[0], &sums[1], &sums[2], &sums[3]);
    fclose(out);
    return exited_ok(pid) && n == 9;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "child") == 0) {
        printf("%s %d %d %d %d\n", openblas_get_corename(), backend_of(LOLDU_FLOAT32), backend_of(LOLDU_FLOAT64),
               backend_of(LOLDU_BFLOAT16), backend_of(LOLDU_FLOAT16));
        double sums[4];
        if (!step_sums(sums)) return 1;
        printf("%.17g %.17g %.17g %.17g\n", sums[0], sums[1], sums[2], sums[3]);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "threads") == 0) return thread_checks() ? 0 : 1;
    if (argc > 1 && strcmp(argv[1], "foreign") == 0) return foreign_checks() ? 0 : 1;
    const char *description = NULL;
    loldu_backend b;
    CHECK(loldu_gemm_backend(LOLDU_BFLOAT16, &b, &description) == LOLDU_OK && description && *description,
          "a description of the bf16 backend");
    int onednn = strstr(description, "oneDNN") != NULL; /* libdnnl.so.2 loaded */
    int amx = cpu_has("amx_bf16"), bf16_units = cpu_has("avx512_bf16") || amx;
    int avx2 = cpu_has("avx2"), avx512 = cpu_has("avx512f");
    printf("CPU: avx2 %d, avx512f %d, bf16 units %d; %s\n", avx2, avx512, bf16_units, description);

    char *clean[] = {NULL};
    char *old[] = {"OPENBLAS_CORETYPE=Prescott", NULL};
    struct { const char *what; char *const *env; } runs[] = {{"env -i", clean}, {"OPENBLAS_CORETYPE=Prescott", old}};
    double sums[2][4];
    for (int i = 0; i < 2; i++) {
        char core[64] = "";
        int got[4];
        CHECK(child(argv[0], runs[i].env, core, got, sums[i]), "%s: the child ran", runs[i].what);
        for (char *c = core; *c; c++) *c = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
        const char *avx512_cores = "skylakex cooperlake sapphirerapids";
        int current = avx512 ? in_list(core, avx512_cores)
                             : in_list(core, avx512_cores) || in_list(core, "haswell zen zen2 zen3 zen4 skylake alderlake");
        int f32 = onednn && !current && avx2 ? LOLDU_BACKEND_ONEDNN : LOLDU_BACKEND_OPENBLAS;
        /* AMX: oneDNN. AVX512-BF16 alone: oneDNN unless widening timed clearly faster (either). */
        int bf16 = onednn && bf16_units ? LOLDU_BACKEND_ONEDNN : LOLDU_BACKEND_WIDENED;
        if (onednn && bf16_units && !amx && got[2] == LOLDU_BACKEND_WIDENED) bf16 = LOLDU_BACKEND_WIDENED;
        printf("%s: OpenBLAS core %s -> float32 %d, float64 %d, bfloat16 %d, float16 %d\n", runs[i].what, core,
               got[0], got[1], got[2], got[3]);
        CHECK(got[0] == f32, "%s: float32 on backend %d, expected %d (OpenBLAS core %s)", runs[i].what, got[0], f32, core);
        CHECK(got[1] == LOLDU_BACKEND_OPENBLAS, "%s: float64 on OpenBLAS", runs[i].what);
        CHECK(got[2] == bf16, "%s: bfloat16 on backend %d, expected %d", runs[i].what, got[2], bf16);
        CHECK(got[3] == LOLDU_BACKEND_WIDENED, "%s: float16 widened", runs[i].what);
        if (i == 1 && avx2) CHECK(got[0] == (onednn ? LOLDU_BACKEND_ONEDNN : LOLDU_BACKEND_OPENBLAS),
                                  "Prescott kernels on an AVX2 CPU send float32 to oneDNN");
    }
    /* The same float32 step from both processes (often on different GEMM libraries): float32
       rounding apart, sums of |.| agree to 1e-5 relative and signed sums to 1e-5 of those. */
    for (int j = 0; j < 4; j += 2) {
        double scale = fmax(sums[0][j + 1], sums[1][j + 1]);
        CHECK(fabs(sums[0][j] - sums[1][j]) <= 1e-5 * scale && fabs(sums[0][j + 1] - sums[1][j + 1]) <= 1e-5 * scale,
              "the float32 step differs between the two processes' GEMM libraries: %s sums %.9g %.9g vs %.9g %.9g",
              j == 0 ? "y" : "dX", sums[0][j], sums[0][j + 1], sums[1][j], sums[1][j + 1]);
    }
    printf("float32 step on both libraries: y sums %.6g / %.6g, dX sums %.6g / %.6g\n", sums[0][0], sums[1][0],
           sums[0][2], sums[1][2]);
    int threads_ok = 1;
    for (int i = 0; i < 2; i++) {
        for (int foreign = 0; foreign < 2; foreign++) {
            int ok = threads_child(argv[0], foreign ? "foreign" : "threads", runs[i].env);
            CHECK(ok, "%s: threads and fork() (backend %s)", runs[i].what, foreign ? "foreign" : "threads");
            threads_ok = threads_ok && ok;
        }
    }
    if (threads_ok) printf("threads: a small product starts no thread; a child forked after two-thread products, ours or "
                           "another library's, computes\n");
    CHECK(loldu_gemm_backend((loldu_dtype)9, &b, NULL) == LOLDU_ERR_INVALID_ARGUMENT, "an unknown dtype is refused");
    if (failures) return 1;
    printf("backend: all checks passed\n");
    return 0;
}
