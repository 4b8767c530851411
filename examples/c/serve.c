/*
 * serve.c — many adapters on one base layer, served in one mixed batch.
 *
 * A pretrained layer is factored once; every other adapter is derived from it in O(r) (its own
 * rank, z and σ; no copy of the weight). A batch whose rows belong to different adapters (any
 * order; -1 = the pretrained layer) then costs one adapter's forward:
 *
 *     y_b = x_b Wᵀ + ((x_b U_Rᵀ) ⊙ c_{a(b)}) A_Rᵀ + b,   c_a = σ_a z_a − σ₀ z_ref,a
 *
 * Each row is checked against the same row computed through its own adapter alone.
 *
 *     cc serve.c $(pkg-config --cflags --libs loldu) -o serve && ./serve
 */
#include <loldu.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

enum { M = 96, N = 80, BASE_RANK = 32, ADAPTERS = 64, BATCH = 200 };

static unsigned long long state = 42;
static float uniform(void) { /* in [-0.5, 0.5) */
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(state >> 40) / (float)(1 << 24) - 0.5f;
}

int main(void) {
    static float weight[M * N], bias[M], x[BATCH * N], y[BATCH * M], alone[BATCH * M];
    for (int i = 0; i < M * N; i++) weight[i] = uniform();
    for (int i = 0; i < M; i++) bias[i] = 0.1f * uniform();
    for (int i = 0; i < BATCH * N; i++) x[i] = 2 * uniform();

    /* The base: one LU of the weight, at the largest rank any adapter will use. */
    loldu_config config;
    CHECK(loldu_config_default(&config));
    config.rank = BASE_RANK;
    loldu_adapter *base = NULL;
    CHECK(loldu_adapter_create(&base, LOLDU_FLOAT32, M, N, weight, bias, &config));

    /* Many adapters derived from it: ranks 4 to 32, each with its own (here: made-up) z. */
    loldu_adapter *adapters[ADAPTERS];
    for (int a = 0; a < ADAPTERS; a++) {
        config.rank = 4 + (a * 7) % (BASE_RANK - 3);
        config.seed = (uint64_t)a;
        CHECK(loldu_adapter_derive(&adapters[a], base, &config));
        float z[BASE_RANK];
        CHECK(loldu_get_z(adapters[a], z));
        for (int k = 0; k < config.rank; k++) z[k] *= 1.0f + uniform();
        CHECK(loldu_set_z(adapters[a], z));
    }
    loldu_adapter_info info;
    CHECK(loldu_adapter_get_info(adapters[1], &info, sizeof info));
    printf("%d adapters on one %d x %d base (factors of rank %lld): each holds %lld bytes of its own\n",
           ADAPTERS, M, N, (long long)info.factor_rank, (long long)info.bytes_state);

    /* One mixed batch: row b belongs to adapter rows[b], in any order; -1 = the base layer. */
    int32_t rows[BATCH];
    for (int b = 0; b < BATCH; b++) rows[b] = (int32_t)((b * 37 + 11) % (ADAPTERS + 1)) - 1;
    CHECK(loldu_grouped_forward(adapters, ADAPTERS, BATCH, rows, x, y));

    /* Every row against its own adapter alone (the factored path, as the grouped call runs). */
    double worst = 0;
    int checked = 0;
    for (int a = -1; a < ADAPTERS; a++) {
        loldu_adapter *own = a < 0 ? base : adapters[a];
        if (a < 0) CHECK(loldu_set_enabled(base, 0)); /* the pretrained layer */
        CHECK(loldu_set_path(own, LOLDU_PATH_FACTORED));
        CHECK(loldu_forward(own, BATCH, x, alone, NULL));
        if (a < 0) CHECK(loldu_set_enabled(base, 1));
        for (int b = 0; b < BATCH; b++) {
            if (rows[b] != a) continue;
            /* Errors relative to the row's largest output: the grouped call multiplies by factors
             * of the base's rank, the adapter alone by its own, so the sums round differently. */
            double scale = 0, error = 0;
            for (int i = 0; i < M; i++) {
                scale = fmax(scale, fabs((double)alone[b * M + i]));
                error = fmax(error, fabs((double)y[b * M + i] - (double)alone[b * M + i]));
            }
            worst = fmax(worst, scale > 0 ? error / scale : error);
            checked++;
        }
    }
    printf("mixed batch of %d rows over %d adapters (and the base): every row equals its own adapter's "
           "(largest difference %.1e of the row's largest output)\n", BATCH, ADAPTERS, worst);
    for (int a = 0; a < ADAPTERS; a++) loldu_adapter_free(adapters[a]);
    loldu_adapter_free(base);
    return checked == BATCH && worst < 1e-5 ? 0 : 1;
}
