/*
 * grouped_loop.c — a loop of loldu_grouped_forward calls, to profile the per-adapter cost of a
 * grouped batch (docs/benchmarks.md, "Many adapters on one base"):
 *
 *     cc -O2 bench/grouped_loop.c $(PKG_CONFIG_PATH=build pkg-config --cflags --libs loldu) -o build/grouped_loop
 *     perf record -o build/grouped.perf build/grouped_loop 256 2000
 *     perf report -i build/grouped.perf --no-children --sort dso,sym
 *
 *     grouped_loop N CALLS [M N_IN RANK BATCH]   (default 384 384 384 256)
 *
 * Rows are spread round-robin over N adapters derived from one base; prints the time per call.
 * With LOLDU_LOOP_BACKWARD=1 in the environment each call is a forward and a backward with dX.
 */
#define _POSIX_C_SOURCE 200809L
#include <loldu.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHECK(call) do { if ((call) != LOLDU_OK) { fprintf(stderr, "%s: %s\n", #call, loldu_last_error()); return 1; } } while (0)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 7) {
        fprintf(stderr, "usage: %s N CALLS [M N_IN RANK BATCH]\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[1]), calls = atoi(argv[2]);
    int m = argc == 7 ? atoi(argv[3]) : 384, n = argc == 7 ? atoi(argv[4]) : 384;
    int r = argc == 7 ? atoi(argv[5]) : 384, batch = argc == 7 ? atoi(argv[6]) : 256;
    if (count < 1 || calls < 1 || m < 1 || n < 1 || r < 1 || batch < 1) return 2;
    float *w = malloc(sizeof(float) * (size_t)m * n), *x = malloc(sizeof(float) * (size_t)batch * n);
    float *y = malloc(sizeof(float) * (size_t)batch * m), *dx = malloc(sizeof(float) * (size_t)batch * n);
    const char *mode = getenv("LOLDU_LOOP_BACKWARD");
    int backward = mode && mode[0] == '1';
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)batch);
    loldu_adapter **list = malloc(sizeof(loldu_adapter *) * (size_t)count);
    if (!w || !x || !y || !dx || !rows || !list) return 1;
    unsigned long long s = 1;
    for (long i = 0; i < (long)m * n; i++) { s = s * 6364136223846793005ull + 1442695040888963407ull; w[i] = (float)(s >> 40) / (float)(1ull << 24) - 0.5f; }
    for (long i = 0; i < (long)batch * n; i++) { s = s * 6364136223846793005ull + 1442695040888963407ull; x[i] = (float)(s >> 40) / (float)(1ull << 24) - 0.5f; }
    loldu_config config;
    CHECK(loldu_config_default(&config));
    config.rank = r;
    loldu_adapter *base = NULL;
    CHECK(loldu_adapter_create(&base, LOLDU_FLOAT32, m, n, w, NULL, &config));
    config.z_init = LOLDU_INIT_NORMAL;
    for (int i = 0; i < count; i++) {
        config.seed = (uint64_t)i + 1;
        CHECK(loldu_adapter_derive(&list[i], base, &config));
    }
    int stride = count > batch ? count / batch : 1;
    for (int b = 0; b < batch; b++) rows[b] = (int32_t)(((long)b * stride) % count);
    double t0 = 0;
    for (int i = -1; i < calls; i++) {  /* call -1 warms up */
        if (i == 0) t0 = now();
        CHECK(loldu_grouped_forward(list, (size_t)count, batch, rows, x, y));
        if (backward) CHECK(loldu_grouped_backward(list, (size_t)count, batch, rows, x, y, dx));
    }
    printf("N = %d, %d × %d, r = %d, B = %d: %.3f ms per loldu_grouped_forward%s\n", count, m, n, r, batch,
           1e3 * (now() - t0) / calls, backward ? " + loldu_grouped_backward" : "");
    for (int i = 0; i < count; i++) loldu_adapter_free(list[i]);
    loldu_adapter_free(base);
    free(w); free(x); free(y); free(dx); free(rows); free(list);
    return 0;
}
