/*
 * train.c — train a LoLDU adapter to fit a target layer, save it, and reload it in a new process.
 *
 *     train DIR            fit, print the loss as it goes down, save the adapter (and the
 *                          optimiser's state, to resume from) to DIR
 *     train --verify DIR   in a fresh process: rebuild the adapter on the same base weight from
 *                          DIR and check that its outputs are bit for bit the saved ones
 *
 *     cc train.c $(pkg-config --cflags --libs loldu) -o train && ./train ckpt && ./train --verify ckpt
 */
#include <loldu.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

enum { M = 64, N = 48, RANK = 16, BATCH = 256, PROBE = 8, STEPS = 300 };
static const char *LAYER = "encoder.layer.0.attention.self.query";

/* Deterministic data, so that the verifying process rebuilds the same base weight. */
static void fill(float *v, int count, unsigned seed, float scale) {
    unsigned long long s = 0x9E3779B97F4A7C15ull * (seed + 1);
    for (int i = 0; i < count; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = scale * ((float)(s >> 40) / (float)(1 << 24) - 0.5f);
    }
}

static float weight[M * N], bias[M];

static void base_layer(void) {
    fill(weight, M * N, 1, 0.5f);
    fill(bias, M, 2, 0.2f);
}

static double loss_and_grad(const float *y, const float *target, float *dy, int count) {
    double loss = 0;
    for (int i = 0; i < count; i++) {
        float d = y[i] - target[i];
        loss += 0.5 * d * d / BATCH;
        dy[i] = d / BATCH;
    }
    return loss;
}

static int train(const char *dir) {
    static float x[BATCH * N], y[BATCH * M], target[BATCH * M], dy[BATCH * M], probe[PROBE * N], out[PROBE * M];
    fill(x, BATCH * N, 3, 2.0f);
    fill(probe, PROBE * N, 4, 2.0f);

    loldu_config config;
    CHECK(loldu_config_default(&config));
    config.rank = RANK;

    /* The target: the same layer with its rank-16 diagonal moved, reachable by training z. */
    loldu_adapter *teacher = NULL, *student = NULL;
    CHECK(loldu_adapter_create(&teacher, LOLDU_FLOAT32, M, N, weight, bias, &config));
    float *tz = NULL;
    CHECK(loldu_params(teacher, (void **)&tz, NULL));
    for (int k = 0; k < RANK; k++) tz[k] *= (k % 2 ? 1.5f : -0.5f);
    CHECK(loldu_forward(teacher, BATCH, x, target, NULL));
    loldu_adapter_free(teacher);

    CHECK(loldu_adapter_create(&student, LOLDU_FLOAT32, M, N, weight, bias, &config));
    loldu_optimizer_config oc;
    CHECK(loldu_optimizer_config_default(&oc, LOLDU_ADAMW));
    oc.lr = 0.05;
    oc.schedule = LOLDU_SCHEDULE_LINEAR;
    oc.warmup_steps = 30;
    oc.total_steps = STEPS;
    oc.weight_decay = 0;
    loldu_optimizer *opt = NULL;
    CHECK(loldu_optimizer_create(&opt, &oc, &student, 1));

    double first = 0, loss = 0;
    for (int step = 0; step < STEPS; step++) {
        CHECK(loldu_forward(student, BATCH, x, y, NULL));
        loss = loss_and_grad(y, target, dy, BATCH * M);
        if (step == 0) first = loss;
        if (step % 50 == 0 || step == STEPS - 1) printf("step %3d  loss %.6f\n", step, loss);
        CHECK(loldu_backward(student, BATCH, x, dy, NULL, NULL));
        CHECK(loldu_optimizer_step(opt, NULL));
        CHECK(loldu_optimizer_zero_grad(opt));
    }
    CHECK(loldu_checkpoint_save(dir, &student, &LAYER, 1));
    /* The optimiser's state too, so that a run could resume exactly here (loldu_optimizer_load). */
    char state[4096];
    snprintf(state, sizeof state, "%s/optimizer.safetensors", dir);
    CHECK(loldu_optimizer_save(opt, state));
    loldu_optimizer_free(opt);

    /* Paths agree to rounding; bit-for-bit comparisons fix one (auto may reuse a cached W_eff). */
    CHECK(loldu_set_path(student, LOLDU_PATH_FACTORED));
    CHECK(loldu_forward(student, PROBE, probe, out, NULL));
    char path[4096];
    snprintf(path, sizeof path, "%s/expected.bin", dir);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(out, sizeof out, 1, f) != 1 || fclose(f) != 0) { perror(path); return 1; }
    loldu_adapter_free(student);
    printf("saved %s/adapter_model.safetensors; loss %.6f -> %.6f\n", dir, first, loss);
    return loss < 0.05 * first ? 0 : 1;
}

static int verify(const char *dir) {
    static float probe[PROBE * N], out[PROBE * M], expected[PROBE * M];
    fill(probe, PROBE * N, 4, 2.0f);
    char path[4096];
    snprintf(path, sizeof path, "%s/expected.bin", dir);
    FILE *f = fopen(path, "rb");
    if (!f || fread(expected, sizeof expected, 1, f) != 1) { perror(path); return 1; }
    fclose(f);

    loldu_checkpoint *ckpt = NULL;
    CHECK(loldu_checkpoint_open(&ckpt, dir));
    loldu_dtype dtype;
    int64_t m, n;
    loldu_config config;
    CHECK(loldu_checkpoint_layer(ckpt, LAYER, &dtype, &m, &n, &config));
    if (dtype != LOLDU_FLOAT32 || m != M || n != N) { fprintf(stderr, "unexpected layer\n"); return 1; }
    loldu_adapter *adapter = NULL;
    CHECK(loldu_adapter_create(&adapter, dtype, m, n, weight, bias, &config));
    CHECK(loldu_checkpoint_apply(ckpt, LAYER, adapter));
    CHECK(loldu_set_path(adapter, LOLDU_PATH_FACTORED));
    CHECK(loldu_forward(adapter, PROBE, probe, out, NULL));
    int same = memcmp(out, expected, sizeof out) == 0;
    printf("reloaded in a new process: outputs %s\n", same ? "bit-identical" : "DIFFER");
    loldu_adapter_free(adapter);
    loldu_checkpoint_free(ckpt);
    return same ? 0 : 1;
}

int main(int argc, char **argv) {
    base_layer();
    if (argc == 2) return train(argv[1]);
    if (argc == 3 && !strcmp(argv[1], "--verify")) return verify(argv[2]);
    fprintf(stderr, "usage: %s DIR | %s --verify DIR\n", argv[0], argv[0]);
    return 2;
}
