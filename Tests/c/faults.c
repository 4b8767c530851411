/*
 * faults.c — the library under real failures, through the C ABI (run by `make test`):
 *   1. out of memory (RLIMIT_AS): the call fails with LOLDU_ERR_OUT_OF_MEMORY and writes nothing;
 *   2. a failing write (RLIMIT_FSIZE, so write() returns EFBIG): LOLDU_ERR_IO, the previous
 *      checkpoint's files are byte for byte intact, and no temporary file is left;
 *   3. an interrupted write (SIGKILL in the middle of saving): the file on disk is always a
 *      complete one, old or new, never a mix.
 * Exit status 0 when every check holds; each failure is printed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <loldu.h>
#include <malloc.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
#define EXPECT(cond, ...)                                                                  \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            failures++;                                                                    \
            fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);              \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, " (last error: %s)\n", loldu_last_error());                    \
        }                                                                                  \
    } while (0)

static loldu_adapter *make_adapter(int dtype, int m, int n, int rank, int with_bias) {
    size_t size = dtype == LOLDU_FLOAT32 ? 4 : 8;
    void *w = malloc(size * (size_t)m * n), *b = malloc(size * (size_t)m);
    for (long i = 0; i < (long)m * n; i++) {
        double v = sin(0.37 * (double)i) + (i % (n + 1) == 0 ? 4 : 0);
        if (dtype == LOLDU_FLOAT32) ((float *)w)[i] = (float)v; else ((double *)w)[i] = v;
    }
    for (int i = 0; i < m; i++) {
        if (dtype == LOLDU_FLOAT32) ((float *)b)[i] = 0.1f * (float)i; else ((double *)b)[i] = 0.1 * i;
    }
    loldu_config c;
    loldu_config_default(&c);
    c.rank = rank;
    loldu_adapter *a = NULL;
    if (loldu_adapter_create(&a, (loldu_dtype)dtype, m, n, w, with_bias ? b : NULL, &c) != LOLDU_OK) {
        fprintf(stderr, "create: %s\n", loldu_last_error());
        exit(1);
    }
    free(w);
    free(b);
    return a;
}

/* 1. Out of memory: leave a few MB of address space, then ask for a 42 MB merged weight. */
static void out_of_memory(void) {
    enum { M = 2304, N = 2304, B = 4 }; /* W_eff: 42 MB, beyond malloc's reusable heap */
    loldu_adapter *a = make_adapter(LOLDU_FLOAT64, M, N, 8, 1);
    static double x[B * N], dy[B * M], dx[B * N], y[B * M];
    for (int i = 0; i < B * N; i++) x[i] = cos(i);
    for (int i = 0; i < B * M; i++) dy[i] = sin(i);
    double *params, *grads, *db;
    loldu_params(a, (void **)&params, (void **)&grads);
    loldu_bias_grad(a, (void **)&db);
    params[0] += 1; /* a z that differs from its initial value */
    loldu_set_path(a, LOLDU_PATH_FACTORED);
    loldu_forward(a, B, x, y, NULL);
    loldu_backward(a, B, x, dy, dx, NULL); /* scratch buffers exist now */
    loldu_zero_grad(a);
    for (int i = 0; i < B * M; i++) y[i] = -7;
    loldu_set_path(a, LOLDU_PATH_MERGED);

    struct rlimit saved, tight;
    getrlimit(RLIMIT_AS, &saved);
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0;
    if (!f || fscanf(f, "%ld", &pages) != 1) { fprintf(stderr, "statm\n"); exit(1); }
    fclose(f);
    tight = saved;
    tight.rlim_cur = (rlim_t)(pages * 4096L + (8L << 20));
    setrlimit(RLIMIT_AS, &tight);
    loldu_status backward = loldu_backward(a, B, x, dy, dx, NULL);
    loldu_status forward = loldu_forward(a, B, x, y, NULL);
    setrlimit(RLIMIT_AS, &saved);

    EXPECT(backward == LOLDU_ERR_OUT_OF_MEMORY, "backward returned %d", backward);
    EXPECT(forward == LOLDU_ERR_OUT_OF_MEMORY, "forward returned %d", forward);
    int untouched = 1;
    for (int k = 0; k <= 8; k++) untouched &= grads[k] == 0;
    for (int i = 0; i < M; i++) untouched &= db[i] == 0;
    EXPECT(untouched, "a failed backward accumulated gradients");
    int y_untouched = 1;
    for (int i = 0; i < B * M; i++) y_untouched &= y[i] == -7;
    EXPECT(y_untouched, "a failed forward wrote y");
    /* With memory back, the same calls work. */
    EXPECT(loldu_backward(a, B, x, dy, dx, NULL) == LOLDU_OK, "backward after the limit is lifted");
    loldu_adapter_free(a);
}

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static char *slurp(const char *path, long *size) {
    *size = file_size(path);
    FILE *f = fopen(path, "rb");
    if (!f || *size < 0) return NULL;
    char *data = malloc((size_t)*size + 1);
    if (fread(data, 1, (size_t)*size, f) != (size_t)*size) { free(data); data = NULL; }
    fclose(f);
    return data;
}

static int entries_in(const char *dir) {
    DIR *d = opendir(dir);
    int count = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) count++;
    if (d) closedir(d);
    return count;
}

/* 2. A write that fails half-way (the file size limit) keeps the previous checkpoint. */
static void failing_write(const char dir[256]) {
    loldu_adapter *a = make_adapter(LOLDU_FLOAT32, 256, 256, 64, 0);
    const char *name = "layer";
    EXPECT(loldu_checkpoint_save(dir, &a, &name, 1) == LOLDU_OK, "first save");
    char model[512], config[512];
    snprintf(model, sizeof model, "%.256s/adapter_model.safetensors", dir);
    snprintf(config, sizeof config, "%.256s/adapter_config.json", dir);
    long model_size, config_size;
    char *model_before = slurp(model, &model_size), *config_before = slurp(config, &config_size);

    float *params;
    loldu_params(a, (void **)&params, NULL);
    for (int k = 0; k < 64; k++) params[k] *= 2;
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit saved, tight;
    getrlimit(RLIMIT_FSIZE, &saved);
    tight = saved;
    tight.rlim_cur = 100; /* the header alone is larger */
    setrlimit(RLIMIT_FSIZE, &tight);
    loldu_status s = loldu_checkpoint_save(dir, &a, &name, 1);
    setrlimit(RLIMIT_FSIZE, &saved);
    EXPECT(s == LOLDU_ERR_IO, "save under a 100-byte file size limit returned %d", s);
    EXPECT(strstr(loldu_last_error(), "cannot write") != NULL, "message \"%s\"", loldu_last_error());

    long size;
    char *model_after = slurp(model, &size);
    EXPECT(size == model_size && model_after && !memcmp(model_after, model_before, (size_t)size),
           "the previous adapter_model.safetensors changed");
    free(model_after);
    char *config_after = slurp(config, &size);
    EXPECT(size == config_size && config_after && !memcmp(config_after, config_before, (size_t)size),
           "the previous adapter_config.json changed");
    free(config_after);
    EXPECT(entries_in(dir) == 2, "%d entries in the directory: a temporary file was left", entries_in(dir));
    free(model_before);
    free(config_before);
    loldu_adapter_free(a);
}

/* Whether `path` is a complete safetensors file: 8 + header + the data its offsets describe. */
static int complete_safetensors(const char *path) {
    long size;
    char *data = slurp(path, &size);
    if (!data || size < 8) { free(data); return 0; }
    unsigned long long header = 0;
    for (int i = 0; i < 8; i++) header |= (unsigned long long)(unsigned char)data[i] << (8 * i);
    if (header > (unsigned long long)size - 8) { free(data); return 0; }
    data[8 + header - 1] = 0; /* the last header byte is a '}' or padding */
    long long end = 0;
    for (char *p = data + 8; (p = strstr(p, "\"data_offsets\":[")); p++) {
        long long a, b;
        if (sscanf(p, "\"data_offsets\":[%lld,%lld]", &a, &b) == 2 && b > end) end = b;
    }
    free(data);
    return (long long)(8 + header) + end == size;
}

/* 3. SIGKILL while exporting a 16 MB file over and over: the file is always complete. */
static void interrupted_write(const char dir[256]) {
    char path[512];
    snprintf(path, sizeof path, "%.256s/merged.safetensors", dir);
    const char *name = "layer";
    srand(7);
    int complete = 0, checks = 0;
    for (int round = 0; round < 12; round++) {
        pid_t child = fork();
        if (child == 0) {
            loldu_adapter *a = make_adapter(LOLDU_FLOAT32, 2048, 2048, 8, 1);
            float *params;
            loldu_params(a, (void **)&params, NULL);
            for (;;) {
                params[0] += 1;
                if (loldu_export_merged(path, &a, &name, 1) != LOLDU_OK) _exit(3);
            }
        }
        struct timespec pause = {0, 150000000L + (long)(rand() % 200) * 1000000L};
        nanosleep(&pause, NULL);
        kill(child, SIGKILL);
        int status;
        waitpid(child, &status, 0);
        EXPECT(WIFSIGNALED(status), "the writer exited early (status %d)", status);
        if (file_size(path) >= 0) {
            checks++;
            complete += complete_safetensors(path);
        }
    }
    EXPECT(checks > 0, "no export finished in 12 rounds");
    EXPECT(complete == checks, "%d of %d files left by a killed writer were incomplete", checks - complete, checks);
    printf("interrupted writes: %d of %d files complete after SIGKILL\n", complete, checks);
}

int main(void) {
    /* One malloc arena: otherwise a thread's arena may hold reserved address space that the
       allocation under RLIMIT_AS silently uses. */
    mallopt(M_ARENA_MAX, 1);
    char dir[] = "/tmp/loldu-faults-XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    out_of_memory();
    char save_dir[256], export_dir[256];
    snprintf(save_dir, sizeof save_dir, "%.200s/ckpt", dir);
    snprintf(export_dir, sizeof export_dir, "%.200s/export", dir);
    mkdir(export_dir, 0755);
    failing_write(save_dir);
    interrupted_write(export_dir);
    char command[4200];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
    if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
    else printf("faults: out of memory, failing and interrupted writes all handled\n");
    return failures ? 1 : 0;
}
