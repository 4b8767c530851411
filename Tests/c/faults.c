/*
 * faults.c — the library under real failures, through the C ABI (run by `make test`):
 *   1. out of memory (RLIMIT_AS): the call fails with LOLDU_ERR_OUT_OF_MEMORY and writes nothing
 *      (in compute calls, file readers, the factorisation and the LoRA export of a tall layer);
 *   2. a failing write (RLIMIT_FSIZE, so write() returns EFBIG): LOLDU_ERR_IO, the previous
 *      checkpoint's files are byte for byte intact, no temporary file is left, and a save into
 *      a new directory leaves no directory;
 *   3. interrupted writes (SIGKILL in the middle of exporting a merged weight, saving an
 *      optimiser state, exporting a LoRA directory): the file or directory on disk is always a
 *      complete one, old or new, never a mix;
 *   4. checkpoint saves killed at random moments (SIGKILL, ≥ 100 times, versions with different
 *      layer sets): the directory always loads as exactly one complete version, and temporary
 *      files of killed saves do not pile up;
 *   5. a full disk while saving a larger checkpoint over a smaller one: injected ENOSPC at every
 *      stage of the save (this program's write() wraps libc's), and a real full tmpfs where this
 *      process may mount one (root in a private mount namespace): the previous checkpoint loads
 *      unchanged and no temporary file is left;
 *   6. an address-space limit before the first BLAS call (a fresh process with one OpenBLAS
 *      thread): too little room for OpenBLAS's work buffer is LOLDU_ERR_OUT_OF_MEMORY naming the
 *      limit, not a hang inside OpenBLAS; enough room works; loldu_set_num_threads refuses
 *      threads whose buffers the limit has no room for, keeping the count; with two threads, a
 *      first threaded product under a limit set after the adapter was made returns.
 * Exit status 0 when every check holds; each failure is printed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <sched.h>
#include <sys/mount.h>
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

/* write() as libloldu sees it: libc's, until `write_budget` bytes have been written, then
   ENOSPC. The library's calls bind to this definition (an executable's symbols come first). */
static long long write_budget = -1; /* < 0: no limit */

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real_write)(int, const void *, size_t);
    if (!real_write) {
        void *symbol = dlsym(RTLD_NEXT, "write"); /* POSIX: a function's address as void * */
        memcpy(&real_write, &symbol, sizeof symbol);
    }
    if (write_budget >= 0) {
        if (write_budget == 0) { errno = ENOSPC; return -1; }
        if ((long long)count > write_budget) count = (size_t)write_budget;
        write_budget -= (long long)count;
    }
    return real_write(fd, buf, count);
}

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

/* Limits the address space to what the process maps now plus `room` bytes; returns the
   previous limit, for setrlimit(RLIMIT_AS, &previous) afterwards. */
static struct rlimit limit_address_space(long room) {
    struct rlimit saved, tight;
    getrlimit(RLIMIT_AS, &saved);
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0;
    if (!f || fscanf(f, "%ld", &pages) != 1) { fprintf(stderr, "statm\n"); exit(1); }
    fclose(f);
    tight = saved;
    tight.rlim_cur = (rlim_t)(pages * sysconf(_SC_PAGESIZE) + room);
    setrlimit(RLIMIT_AS, &tight);
    return saved;
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

    struct rlimit saved = limit_address_space(8L << 20);
    loldu_status backward = loldu_backward(a, B, x, dy, dx, NULL);
    loldu_status forward = loldu_forward(a, B, x, y, NULL);
    double into[9];
    for (int k = 0; k <= 8; k++) into[k] = 42;
    loldu_status backward_into = loldu_backward_into(a, B, x, dy, dx, NULL, into);
    setrlimit(RLIMIT_AS, &saved);

    EXPECT(backward == LOLDU_ERR_OUT_OF_MEMORY, "backward returned %d", backward);
    EXPECT(forward == LOLDU_ERR_OUT_OF_MEMORY, "forward returned %d", forward);
    EXPECT(backward_into == LOLDU_ERR_OUT_OF_MEMORY, "backward_into returned %d", backward_into);
    int into_untouched = 1;
    for (int k = 0; k <= 8; k++) into_untouched &= into[k] == 42;
    EXPECT(into_untouched, "a failed backward_into wrote its gradient buffer");
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

/* 1b. Out of memory in a grouped call whose working tables scale with the batch: a status, not
   a trap (4 Mi rows of a 1 × 1 layer: the caller's buffers exist, the call's 16 MB do not). */
static void grouped_out_of_memory(void) {
    enum { B = 1 << 22 };
    loldu_adapter *a = make_adapter(LOLDU_FLOAT64, 1, 1, 1, 0);
    double *x = malloc(sizeof(double) * B), *y = malloc(sizeof(double) * B);
    int32_t *rows = malloc(sizeof(int32_t) * B);
    if (!x || !y || !rows) { fprintf(stderr, "malloc\n"); exit(1); }
    for (int i = 0; i < B; i++) { x[i] = 1; y[i] = -7; rows[i] = 0; }
    struct rlimit saved = limit_address_space(4L << 20);
    loldu_status forward = loldu_grouped_forward(&a, 1, B, rows, x, y);
    setrlimit(RLIMIT_AS, &saved);
    EXPECT(forward == LOLDU_ERR_OUT_OF_MEMORY, "grouped forward returned %d", forward);
    int untouched = 1;
    for (int i = 0; i < B; i++) untouched &= y[i] == -7;
    EXPECT(untouched, "a failed grouped forward wrote y");
    EXPECT(loldu_grouped_forward(&a, 1, B, rows, x, y) == LOLDU_OK, "grouped forward after the limit is lifted");
    /* Every row its own entry of a list much longer than the batch (the used adapters are then
       found through collections that grow with the batch): OK or out of memory at any room. */
    size_t count = 4 * (size_t)B + 5000;
    loldu_adapter **list = malloc(count * sizeof *list);
    if (!list) { fprintf(stderr, "malloc\n"); exit(1); }
    for (size_t i = 0; i < count; i++) list[i] = a;
    for (int i = 0; i < B; i++) rows[i] = i;
    for (long room = 8; room <= 512; room *= 2) {
        saved = limit_address_space(room << 20);
        loldu_status s = loldu_grouped_forward(list, count, B, rows, x, y);
        setrlimit(RLIMIT_AS, &saved);
        EXPECT(s == LOLDU_OK || s == LOLDU_ERR_OUT_OF_MEMORY, "grouped forward over %zu adapters with %ld MiB of room returned %d", count, room, s);
    }
    free(list);
    free(x);
    free(y);
    free(rows);
    loldu_adapter_free(a);
}

/* An empty file of `size` bytes (no blocks on disk). */
static int sparse_file(const char *path, long size) {
    FILE *f = fopen(path, "w");
    if (!f) return 0;
    fclose(f);
    return truncate(path, size) == 0;
}

/* 1c. A huge file where a small one is expected (a sparse 256 MiB optimiser state and
   checkpoint model file, within the 1 GiB read limit): with no memory left to read it, a
   status, not a trap. */
static void huge_files_out_of_memory(const char *dir) {
    char state[512], ckpt[512], model[512], config[512];
    snprintf(state, sizeof state, "%.300s/huge-state.safetensors", dir);
    snprintf(ckpt, sizeof ckpt, "%.300s/huge-ckpt", dir);
    snprintf(model, sizeof model, "%.300s/adapter_model.safetensors", ckpt);
    snprintf(config, sizeof config, "%.300s/adapter_config.json", ckpt);
    mkdir(ckpt, 0755);
    FILE *c = fopen(config, "w");
    if (c) { fputs("{\"peft_type\": \"LOLDU\"}", c); fclose(c); }
    if (!sparse_file(state, 256L << 20) || !sparse_file(model, 256L << 20)) {
        perror("sparse file");
        failures++;
        return;
    }
    loldu_adapter *a = make_adapter(LOLDU_FLOAT32, 8, 8, 4, 0);
    loldu_optimizer_config oc;
    loldu_optimizer_config_default(&oc, LOLDU_ADAMW);
    loldu_optimizer *opt = NULL;
    if (loldu_optimizer_create(&opt, &oc, &a, 1) != LOLDU_OK) { fprintf(stderr, "optimizer\n"); exit(1); }
    struct rlimit saved = limit_address_space(16L << 20);
    loldu_status load = loldu_optimizer_load(opt, state);
    loldu_checkpoint *checkpoint = NULL;
    loldu_status open = loldu_checkpoint_open(&checkpoint, ckpt);
    setrlimit(RLIMIT_AS, &saved);
    EXPECT(load == LOLDU_ERR_OUT_OF_MEMORY, "optimizer_load of a huge file returned %d", load);
    EXPECT(open == LOLDU_ERR_OUT_OF_MEMORY, "checkpoint_open of a huge file returned %d", open);
    EXPECT(checkpoint == NULL, "a failed open returned a checkpoint");
    /* With memory back, the zeros are read and refused as what they are. */
    EXPECT(loldu_optimizer_load(opt, state) == LOLDU_ERR_FORMAT, "a file of zeros is a format error");
    loldu_optimizer_free(opt);
    loldu_adapter_free(a);
}

/* 1d. A tall layer (4 Mi × 1, its weight borrowed) factored, then exported as a LoRA, under
   ever larger address-space limits: working buffers that scale with m (the row permutation, the
   exported factors in double) are allocations that may fail, so every call succeeds or returns
   LOLDU_ERR_OUT_OF_MEMORY, and some room suffices for both. */
static void tall_layer_out_of_memory(const char *dir) {
    enum { M = 1 << 22 };
    float *w = malloc(sizeof(float) * M);
    if (!w) { fprintf(stderr, "malloc\n"); exit(1); }
    for (int i = 0; i < M; i++) w[i] = (float)sin(0.37 * i) + (i == 0 ? 4.0f : 0.0f);
    loldu_config c;
    loldu_config_default(&c);
    c.rank = 1;
    c.borrow_weight = 1;
    const char *name = "tall";
    char out[512];  /* one export directory, replaced by each (16 MB) */
    snprintf(out, sizeof out, "%.300s/tall-lora", dir);
    loldu_lora_options options;
    loldu_lora_options_default(&options);
    options.replace = 1;
    int created = 0, exported = 0;
    for (long room = 0; room <= (320L << 20); room += 16L << 20) {
        loldu_adapter *a = NULL;
        struct rlimit saved = limit_address_space(room);
        loldu_status create = loldu_adapter_create(&a, LOLDU_FLOAT32, M, 1, w, NULL, &c);
        loldu_status export = create == LOLDU_OK ? loldu_export_lora(out, &a, &name, 1, &options) : LOLDU_OK;
        setrlimit(RLIMIT_AS, &saved);
        EXPECT(create == LOLDU_OK || create == LOLDU_ERR_OUT_OF_MEMORY, "create of a %d × 1 layer with %ld MB of room returned %d", M, room >> 20, create);
        EXPECT(export == LOLDU_OK || export == LOLDU_ERR_OUT_OF_MEMORY, "export_lora with %ld MB of room returned %d", room >> 20, export);
        created += create == LOLDU_OK;
        exported += create == LOLDU_OK && export == LOLDU_OK;
        loldu_adapter_free(a);
    }
    EXPECT(created > 0 && exported > 0, "a %d × 1 layer was created %d times and exported %d times with up to 320 MB of room", M, created, exported);
    free(w);
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
    else data[*size] = 0; /* (text files are read as strings) */
    fclose(f);
    return data;
}

/* Entries of `dir` (without "." and ".."), or only those named ".…": temporaries of writes. */
static int count_entries(const char *dir, int temporaries_only) {
    DIR *d = opendir(dir);
    int count = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && (!temporaries_only || e->d_name[0] == '.')) count++;
    if (d) closedir(d);
    return count;
}

static int entries_in(const char *dir) { return count_entries(dir, 0); }
static int temporaries_in(const char *dir) { return count_entries(dir, 1); }

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
    char fresh[512];  /* a save into a directory it creates, failing the same way */
    snprintf(fresh, sizeof fresh, "%.256s-fresh", dir);
    loldu_status s_fresh = loldu_checkpoint_save(fresh, &a, &name, 1);
    setrlimit(RLIMIT_FSIZE, &saved);
    EXPECT(s == LOLDU_ERR_IO, "save under a 100-byte file size limit returned %d", s);
    EXPECT(strstr(loldu_last_error(), "cannot write") != NULL, "message \"%s\"", loldu_last_error());
    EXPECT(s_fresh == LOLDU_ERR_IO, "save into a new directory under the limit returned %d", s_fresh);
    struct stat st;
    EXPECT(stat(fresh, &st) != 0 && errno == ENOENT, "a failed save left the directory it created");

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

/* Whether `dir` holds a complete LoRA export: both files, the tensors whole, the JSON closed. */
static int complete_lora_export(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%.256s/adapter_model.safetensors", dir);
    if (!complete_safetensors(path)) return 0;
    snprintf(path, sizeof path, "%.256s/adapter_config.json", dir);
    long size;
    char *config = slurp(path, &size);
    const char *end = config ? strrchr(config, '}') : NULL; /* only blanks may follow it */
    int whole = end && strstr(config, "\"peft_type\"") && strspn(end + 1, " \n") == strlen(end + 1);
    free(config);
    return whole != 0;
}

/* 3. SIGKILL in the middle of each kind of write, over and over: what is on disk is always a
 * complete file (or export directory), old or new. A child writes in a loop, changing z before
 * each write; once its first write is done, the parent kills it at a random moment and checks
 * what it left. */
enum { WRITE_MERGED, WRITE_OPTIMIZER, WRITE_LORA, WRITE_KINDS };
static const char *const write_names[WRITE_KINDS] = {"loldu_export_merged", "loldu_optimizer_save",
                                                     "loldu_export_lora"};

static _Noreturn void write_forever(int kind, const char *path, int ready) {
    const char *name = "layer";
    /* 16 MB merged weight; 8 MB of LoRA tensors (rank 512); the optimiser state is small, so
     * its loop spends its time in the writes' fsync and rename. */
    loldu_adapter *a = make_adapter(LOLDU_FLOAT32, 2048, 2048, kind == WRITE_MERGED ? 8 : 512, 1);
    float *params;
    loldu_params(a, (void **)&params, NULL);
    loldu_optimizer *opt = NULL;
    loldu_optimizer_config oc;
    loldu_optimizer_config_default(&oc, LOLDU_ADAMW);
    loldu_lora_options lo;
    loldu_lora_options_default(&lo);
    lo.replace = 1;
    if (kind == WRITE_OPTIMIZER && loldu_optimizer_create(&opt, &oc, &a, 1) != LOLDU_OK) _exit(3);
    for (;;) {
        params[0] += 1;
        loldu_status s = LOLDU_OK;
        switch (kind) {
        case WRITE_MERGED: s = loldu_export_merged(path, &a, &name, 1); break;
        case WRITE_OPTIMIZER:
            if ((s = loldu_optimizer_step(opt, NULL)) == LOLDU_OK) s = loldu_optimizer_save(opt, path);
            break;
        case WRITE_LORA: s = loldu_export_lora(path, &a, &name, 1, &lo); break;
        }
        if (s != LOLDU_OK) _exit(4);
        if (ready >= 0) { /* one write done: the parent's clock starts */
            if (write(ready, "w", 1) != 1) _exit(5);
            close(ready);
            ready = -1;
        }
    }
}

static void interrupted_writes(const char dir[256]) {
    srand(7);
    for (int kind = 0; kind < WRITE_KINDS; kind++) {
        char folder[512], path[600];
        snprintf(folder, sizeof folder, "%.256s/%s", dir, write_names[kind]);
        snprintf(path, sizeof path, "%s/out", folder);
        mkdir(folder, 0755);
        int complete = 0, checks = 0;
        for (int round = 0; round < 10; round++) {
            int ready[2];
            if (pipe(ready) != 0) { perror("pipe"); exit(1); }
            pid_t child = fork();
            if (child == 0) {
                close(ready[0]);
                write_forever(kind, path, ready[1]);
            }
            close(ready[1]);
            char byte;
            ssize_t got = read(ready[0], &byte, 1); /* (0: the writer died before its first write) */
            close(ready[0]);
            /* A random moment of the next writes (each takes some 5 to 250 ms here). */
            struct timespec pause = {0, (long)(rand() % 300) * 1000000L};
            if (got == 1) nanosleep(&pause, NULL);
            kill(child, SIGKILL);
            int status;
            waitpid(child, &status, 0);
            EXPECT(WIFSIGNALED(status), "%s: the writer exited early (status %d)", write_names[kind], status);
            checks++;
            complete += kind == WRITE_LORA ? complete_lora_export(path) : complete_safetensors(path);
        }
        EXPECT(complete == checks, "%s: %d of %d outputs left by a killed writer were incomplete",
               write_names[kind], checks - complete, checks);
        /* Each write removes what killed ones left: at most the last one's remains. */
        int left = temporaries_in(folder);
        EXPECT(left <= 1, "%s: %d temporaries left by 10 killed writes", write_names[kind], left);
        printf("interrupted writes: %s: %d of %d outputs complete after SIGKILL, %d temporary left\n",
               write_names[kind], complete, checks, left);
    }
}


/* --- 4 and 5: whole checkpoints ------------------------------------------------------------ */

/* Three versions with different layer sets; version v's layer k has z = 100 v + k + (0.01 j). */
enum { VERSIONS = 3, LAYERS_MAX = 4, VM = 24, VN = 20, VR = 8 };
static const int version_layers[VERSIONS] = {2, 4, 1};
static const char *layer_names[VERSIONS][LAYERS_MAX] = {
    {"encoder.0.query", "encoder.0.value", NULL, NULL},
    {"encoder.0.query", "encoder.1.key", "encoder.1.value", "head"},
    {"encoder.2.dense", NULL, NULL, NULL},
};
static float version_weight[VM * VN];

static loldu_adapter *version_adapter(int v, int k) {
    loldu_config c;
    loldu_config_default(&c);
    c.rank = VR;
    loldu_adapter *a = NULL;
    if (loldu_adapter_create(&a, LOLDU_FLOAT32, VM, VN, version_weight, NULL, &c) != LOLDU_OK) {
        fprintf(stderr, "create: %s\n", loldu_last_error());
        exit(1);
    }
    float z[VR];
    for (int j = 0; j < VR; j++) z[j] = 100.0f * (float)v + (float)k + 0.01f * (float)j;
    loldu_set_z(a, z);
    return a;
}

static loldu_status save_version(const char *dir, int v) {
    loldu_adapter *list[LAYERS_MAX] = {NULL};
    for (int k = 0; k < version_layers[v]; k++) list[k] = version_adapter(v, k);
    loldu_status s = loldu_checkpoint_save(dir, list, layer_names[v], (size_t)version_layers[v]);
    for (int k = 0; k < version_layers[v]; k++) loldu_adapter_free(list[k]);
    return s;
}

/* Which version `dir` loads as, completely and exactly; -1 if none (or it does not load). */
static int loaded_version(const char *dir) {
    loldu_checkpoint *ckpt = NULL;
    if (loldu_checkpoint_open(&ckpt, dir) != LOLDU_OK) return -1;
    size_t count = 0;
    loldu_checkpoint_count(ckpt, &count);
    int found = -1;
    for (int v = 0; v < VERSIONS && found < 0; v++) {
        if (count != (size_t)version_layers[v]) continue;
        int same = 1;
        for (int k = 0; k < version_layers[v] && same; k++) {
            const char *name = NULL;
            loldu_checkpoint_name(ckpt, (size_t)k, &name);
            same = name && !strcmp(name, layer_names[v][k]);
            loldu_adapter *a = version_adapter(v, k);
            float expected[VR], z[VR];
            loldu_get_z(a, expected);
            loldu_set_z(a, (float[VR]){0});
            same = same && loldu_checkpoint_apply(ckpt, layer_names[v][k], a) == LOLDU_OK &&
                   loldu_get_z(a, z) == LOLDU_OK && !memcmp(z, expected, sizeof z);
            loldu_adapter_free(a);
        }
        if (same) found = v;
    }
    loldu_checkpoint_free(ckpt);
    return found;
}

/* 4. SIGKILL at random moments of a save loop cycling through the versions. */
static void killed_saves(const char dir[256]) {
    enum { KILLS = 120 };
    EXPECT(save_version(dir, 0) == LOLDU_OK, "first save");
    srand(11);
    int loaded[VERSIONS] = {0}, broken = 0, most_temporaries = 0, interrupted = 0;
    for (int round = 0; round < KILLS; round++) {
        int ready[2];
        if (pipe(ready) != 0) { perror("pipe"); exit(1); }
        pid_t child = fork();
        if (child == 0) {
            close(ready[0]);
            for (int i = round;; i++) {
                if (i == round && write(ready[1], "x", 1) != 1) _exit(4);
                if (save_version(dir, i % VERSIONS) != LOLDU_OK) _exit(3);
            }
        }
        close(ready[1]);
        char byte;
        if (read(ready[0], &byte, 1) != 1) { fprintf(stderr, "child did not start\n"); exit(1); }
        close(ready[0]);
        /* Anywhere in the first few saves (one takes a few milliseconds, most of it fsync). */
        struct timespec pause = {0, (long)(rand() % 30000) * 1000L};
        nanosleep(&pause, NULL);
        kill(child, SIGKILL);
        int status;
        waitpid(child, &status, 0);
        EXPECT(WIFSIGNALED(status), "the saver exited early (status %d): %s", status, loldu_last_error());
        int v = loaded_version(dir);
        if (v < 0) broken++; else loaded[v]++;
        int t = temporaries_in(dir);
        if (t > most_temporaries) most_temporaries = t;
        if (t > 0) interrupted++;  /* (the kill landed inside a save: its temporaries are left) */
    }
    EXPECT(interrupted > 0, "no kill landed inside a save: the test interrupted none");
    EXPECT(broken == 0, "%d of %d killed saves left a directory that is neither version", broken, KILLS);
    /* At most what the last killed save left (its two temporary files and its pending config). */
    EXPECT(most_temporaries <= 3, "up to %d temporary files piled up", most_temporaries);
    EXPECT(save_version(dir, 2) == LOLDU_OK && temporaries_in(dir) == 0 && entries_in(dir) == 2,
           "the next save left %d temporary files", temporaries_in(dir));
    printf("killed saves: %d kills (%d inside a save), loaded as version 0/1/2: %d/%d/%d, torn: %d, at most %d "
           "temporary files\n", KILLS, interrupted, loaded[0], loaded[1], loaded[2], broken, most_temporaries);
}

/* 5a. ENOSPC injected after every prefix of a larger save: the smaller checkpoint stays. */
static void injected_full_disk(const char dir[256]) {
    EXPECT(save_version(dir, 2) == LOLDU_OK, "first save");
    /* Bytes a complete save of version 1 writes, measured with an unlimited budget. */
    write_budget = 1LL << 40;
    EXPECT(save_version(dir, 1) == LOLDU_OK, "measuring save");
    long long needed = (1LL << 40) - write_budget;
    write_budget = -1;
    EXPECT(save_version(dir, 2) == LOLDU_OK, "back to version 2");
    int refused = 0;
    for (long long budget = 0; budget < needed; budget += budget < 64 ? 1 : 61) {
        write_budget = budget;
        loldu_status s = save_version(dir, 1);
        write_budget = -1;
        EXPECT(s == LOLDU_ERR_IO, "save with %lld of %lld bytes of space returned %d", budget, needed, s);
        EXPECT(strstr(loldu_last_error(), "No space left") != NULL, "message \"%s\"", loldu_last_error());
        EXPECT(loaded_version(dir) == 2, "after ENOSPC at byte %lld the directory does not load as before", budget);
        EXPECT(temporaries_in(dir) == 0, "ENOSPC at byte %lld left %d temporary files", budget, temporaries_in(dir));
        refused++;
    }
    write_budget = needed;
    EXPECT(save_version(dir, 1) == LOLDU_OK && loaded_version(dir) == 1, "with exactly enough space the save works");
    write_budget = -1;
    printf("injected full disk: %d saves refused at every stage, previous checkpoint intact each time\n", refused);
}

/* 5b. A real full file system: a small tmpfs in a private mount namespace, when allowed. */
static void tmpfs_full_disk(const char mountpoint[256]) {
    if (unshare(CLONE_NEWNS) != 0 || mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0 ||
        mount("tmpfs", mountpoint, "tmpfs", 0, "size=64k") != 0) {
        printf("tmpfs full disk: skipped (cannot mount here: %s); the injected ENOSPC covers it\n", strerror(errno));
        return;
    }
    char dir[512], filler[512];
    snprintf(dir, sizeof dir, "%.256s/ckpt", mountpoint);
    snprintf(filler, sizeof filler, "%.256s/filler", mountpoint);
    EXPECT(save_version(dir, 2) == LOLDU_OK, "first save on tmpfs");
    int refused = 0;
    for (int free_bytes = 0; free_bytes <= 8192; free_bytes += 512) {
        FILE *f = fopen(filler, "wb"); /* fill the disk, then free `free_bytes` */
        static char block[4096];
        while (f && fwrite(block, 1, sizeof block, f) == sizeof block) {}
        if (f) fclose(f);
        if (truncate(filler, file_size(filler) - free_bytes) != 0) perror("truncate");
        loldu_status s = save_version(dir, 1);
        unlink(filler);
        if (s == LOLDU_OK) { EXPECT(loaded_version(dir) == 1, "a save that succeeded"); save_version(dir, 2); continue; }
        refused++;
        EXPECT(s == LOLDU_ERR_IO, "full tmpfs save returned %d", s);
        EXPECT(loaded_version(dir) == 2, "with %d bytes free the previous checkpoint was lost", free_bytes);
        EXPECT(temporaries_in(dir) == 0, "a temporary file was left on the full disk");
    }
    EXPECT(refused > 0, "the tmpfs never filled up");
    umount(mountpoint);
    printf("tmpfs full disk: %d saves refused on a full 64 KiB tmpfs, previous checkpoint intact each time\n", refused);
}

/* 6. The child (a fresh process, OPENBLAS_NUM_THREADS=1, so no OpenBLAS worker threads yet):
   the library's first BLAS call and added threads under tight limits. Before the library
   checked the room, such calls never returned (OpenBLAS retries its failed mapping forever):
   the child's alarm turns that into SIGALRM. */
static int blas_buffer_child(void) {
    signal(SIGALRM, SIG_DFL); /* (an ignored or blocked SIGALRM survives exec) */
    sigset_t alarm_only;
    sigemptyset(&alarm_only);
    sigaddset(&alarm_only, SIGALRM);
    sigprocmask(SIG_UNBLOCK, &alarm_only, NULL);
    alarm(60);
    float w[64 * 64], x[64], y[64];
    for (int i = 0; i < 64 * 64; i++) w[i] = (float)sin(0.37 * i) + (i % 65 == 0 ? 4.0f : 0.0f);
    for (int i = 0; i < 64; i++) x[i] = 1;
    loldu_adapter *a = NULL, *b = NULL;
    struct rlimit saved = limit_address_space(32L << 20);
    loldu_status tight = loldu_adapter_create(&a, LOLDU_FLOAT32, 64, 64, w, NULL, NULL);
    setrlimit(RLIMIT_AS, &saved);
    EXPECT(tight == LOLDU_ERR_OUT_OF_MEMORY && a == NULL, "create under a tight limit returned %d", tight);
    EXPECT(tight != LOLDU_ERR_OUT_OF_MEMORY || strstr(loldu_last_error(), "RLIMIT_AS"),
           "the message does not name the limit: %s", loldu_last_error());

    saved = limit_address_space(200L << 20);
    loldu_status roomy = loldu_adapter_create(&a, LOLDU_FLOAT32, 64, 64, w, NULL, NULL);
    loldu_status forward = roomy == LOLDU_OK ? loldu_forward(a, 1, x, y, NULL) : roomy;
    setrlimit(RLIMIT_AS, &saved);
    EXPECT(roomy == LOLDU_OK && forward == LOLDU_OK, "create/forward with room returned %d/%d: %s", roomy,
           forward, loldu_last_error());

    /* A second thread needs its own buffer and stack, and takes the caller's free buffer, so
       the caller's next call maps another: 132 MiB is room for the buffer alone. */
    int refused = 0;
    for (long room = 32; room <= 132; room += 100) {
        saved = limit_address_space(room << 20);
        loldu_status more = loldu_set_num_threads(2);
        int threads = loldu_get_num_threads();
        setrlimit(RLIMIT_AS, &saved);
        EXPECT(more == LOLDU_ERR_OUT_OF_MEMORY && threads == 1,
               "set_num_threads(2) with %ld MiB of room returned %d, threads now %d", room, more, threads);
        refused += more == LOLDU_ERR_OUT_OF_MEMORY;
    }
    saved = limit_address_space(600L << 20);
    loldu_status more = loldu_set_num_threads(2);
    roomy = more == LOLDU_OK ? loldu_adapter_create(&b, LOLDU_FLOAT32, 64, 64, w, NULL, NULL) : more;
    forward = roomy == LOLDU_OK ? loldu_forward(b, 1, x, y, NULL) : roomy;
    setrlimit(RLIMIT_AS, &saved);
    EXPECT(more == LOLDU_OK && roomy == LOLDU_OK && forward == LOLDU_OK,
           "with room for a second thread: set_num_threads %d, create %d, forward %d: %s", more, roomy, forward,
           loldu_last_error());
    loldu_adapter_free(a);
    loldu_adapter_free(b);
    if (!failures) printf("address-space limits: first BLAS call refused (no hang), %d thread increases refused, both work with room\n", refused);
    return failures ? 1 : 0;
}

extern char **environ;

/* 6b. A fresh process whose OpenBLAS runs two threads: its first threaded product (a 1 × 1 layer
   on 2^20 rows), under limits set after the adapter was made, returns (OK or out of memory)
   instead of waiting for ever in OpenBLAS, which gives each worker a buffer at its first product. */
static int threaded_product_child(void) {
    signal(SIGALRM, SIG_DFL);
    sigset_t alarm_only;
    sigemptyset(&alarm_only);
    sigaddset(&alarm_only, SIGALRM);
    sigprocmask(SIG_UNBLOCK, &alarm_only, NULL);
    alarm(60);
    enum { B = 1 << 20 };
    double w = 2, *x = malloc(sizeof(double) * B), *y = malloc(sizeof(double) * B);
    if (!x || !y) { fprintf(stderr, "malloc\n"); exit(1); }
    for (int i = 0; i < B; i++) x[i] = 1;
    loldu_adapter *a = NULL;
    EXPECT(loldu_adapter_create(&a, LOLDU_FLOAT64, 1, 1, &w, NULL, NULL) == LOLDU_OK, "create");
    for (long room = 4; room <= 64; room *= 2) {
        struct rlimit saved = limit_address_space(room << 20);
        loldu_status s = loldu_forward(a, B, x, y, NULL);
        setrlimit(RLIMIT_AS, &saved);
        EXPECT(s == LOLDU_OK || s == LOLDU_ERR_OUT_OF_MEMORY, "forward of %d rows with %ld MiB of room returned %d", B, room, s);
    }
    loldu_adapter_free(a);
    free(x);
    free(y);
    return failures ? 1 : 0;
}

/* Runs this program as `mode` in a fresh process with `threads` OpenBLAS threads. */
static void blas_child(const char *mode, const char *threads) {
    /* The child's environment is built before fork (OpenBLAS's threads run in this process). */
    int count = 0;
    while (environ[count]) count++;
    char **env = calloc((size_t)count + 2, sizeof *env);
    int kept = 0;
    for (int i = 0; i < count; i++)
        if (strncmp(environ[i], "OPENBLAS_NUM_THREADS=", 21)) env[kept++] = environ[i];
    char variable[64];
    snprintf(variable, sizeof variable, "OPENBLAS_NUM_THREADS=%s", threads);
    env[kept++] = variable;
    char *args[] = {"faults", (char *)mode, NULL};
    pid_t child = fork();
    if (child == 0) {
        execve("/proc/self/exe", args, env);
        _exit(127);
    }
    free(env);
    EXPECT(child > 0, "fork: %s", strerror(errno));
    if (child <= 0) return;
    int status = 0;
    pid_t waited;
    while ((waited = waitpid(child, &status, 0)) < 0 && errno == EINTR) {}
    EXPECT(waited == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "address-space limits: child %s %s %d (SIGALRM: it hung)", mode,
           WIFSIGNALED(status) ? "killed by signal" : "exited with", WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--blas-buffer-child")) {
        mallopt(M_ARENA_MAX, 1);
        return blas_buffer_child();
    }
    if (argc > 1 && !strcmp(argv[1], "--threaded-product-child")) {
        mallopt(M_ARENA_MAX, 1);
        return threaded_product_child();
    }
    blas_child("--blas-buffer-child", "1");
    blas_child("--threaded-product-child", "2");
    /* One malloc arena: otherwise a thread's arena may hold reserved address space that the
       allocation under RLIMIT_AS silently uses. */
    mallopt(M_ARENA_MAX, 1);
    char dir[] = "/tmp/loldu-faults-XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    out_of_memory();
    grouped_out_of_memory();
    huge_files_out_of_memory(dir);
    tall_layer_out_of_memory(dir);
    char save_dir[256], export_dir[256];
    snprintf(save_dir, sizeof save_dir, "%.200s/ckpt", dir);
    snprintf(export_dir, sizeof export_dir, "%.200s/export", dir);
    mkdir(export_dir, 0755);
    failing_write(save_dir);
    interrupted_writes(export_dir);
    for (int i = 0; i < VM * VN; i++) version_weight[i] = (float)sin(0.91 * i) + (i % (VN + 1) == 0 ? 3.0f : 0.0f);
    char killed_dir[256], full_dir[256], mountpoint[256];
    snprintf(killed_dir, sizeof killed_dir, "%.200s/killed", dir);
    snprintf(full_dir, sizeof full_dir, "%.200s/full", dir);
    snprintf(mountpoint, sizeof mountpoint, "%.200s/tmpfs", dir);
    killed_saves(killed_dir);
    injected_full_disk(full_dir);
    mkdir(mountpoint, 0755);
    tmpfs_full_disk(mountpoint);
    char command[4200];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
    if (failures) fprintf(stderr, "%d check(s) failed\n", failures);
    else printf("faults: out of memory, failing, interrupted and killed writes and full disks all handled\n");
    return failures ? 1 : 0;
}
