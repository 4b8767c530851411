/* Which GEMM library each element type gets, from a clean environment (env -i) and with
 * OpenBLAS forced onto kernels older than the CPU: the rule of loldu_gemm_backend, checked
 * against /proc/cpuinfo and the core OpenBLAS reports in the same process.
 *
 *   backend          run the checks (starts itself as "backend child" in each environment)
 *   backend child    print "core f32 f64 bf16 f16" for this process
 */
#define _POSIX_C_SOURCE 200809L
#include <loldu.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* Runs this program as a child with `env` and reads its line. */
static int child(const char *self, char *const env[], char core[64], int b[4]) {
    int fd[2];
    if (pipe(fd) != 0) return 0;
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 1);
        char *const args[] = {(char *)self, "child", NULL};
        execve(self, args, env);
        _exit(127);
    }
    close(fd[1]);
    FILE *out = fdopen(fd[0], "r");
    int n = fscanf(out, "%63s %d %d %d %d", core, &b[0], &b[1], &b[2], &b[3]);
    fclose(out);
    int status = 0;
    waitpid(pid, &status, 0);
    return n == 5 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "child") == 0) {
        printf("%s %d %d %d %d\n", openblas_get_corename(), backend_of(LOLDU_FLOAT32), backend_of(LOLDU_FLOAT64),
               backend_of(LOLDU_BFLOAT16), backend_of(LOLDU_FLOAT16));
        return 0;
    }
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
    for (int i = 0; i < 2; i++) {
        char core[64] = "";
        int got[4];
        CHECK(child(argv[0], runs[i].env, core, got), "%s: the child ran", runs[i].what);
        for (char *c = core; *c; c++) *c = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
        const char *avx512_cores = "skylakex cooperlake sapphirerapids";
        int current = avx512 ? in_list(core, avx512_cores)
                             : in_list(core, avx512_cores) || in_list(core, "haswell zen zen2 zen3 zen4 skylake alderlake");
        int f32 = onednn && !current && avx2 ? LOLDU_BACKEND_ONEDNN : LOLDU_BACKEND_OPENBLAS;
        /* AMX: oneDNN. AVX512-BF16 alone: whichever the library timed faster (either). */
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
    CHECK(loldu_gemm_backend((loldu_dtype)9, &b, NULL) == LOLDU_ERR_INVALID_ARGUMENT, "an unknown dtype is refused");
    if (failures) return 1;
    printf("backend: all checks passed\n");
    return 0;
}
