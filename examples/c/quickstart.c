/*
 * quickstart.c — a LoLDU adapter from C: create it on a pretrained weight, run forward and
 * backward, read the gradients, and see how a mistake is reported.
 *
 *     cc quickstart.c $(pkg-config --cflags --libs loldu) -o quickstart && ./quickstart
 */
#include <loldu.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

enum { M = 6, N = 4, RANK = 2, B = 3 };

static void print_row(const char *name, const float *v, int count) {
    printf("%-4s", name);
    for (int i = 0; i < count; i++) printf(" %9.5f", v[i]);
    printf("\n");
}

int main(void) {
    if (loldu_version_number() != LOLDU_VERSION_NUMBER) {
        fprintf(stderr, "header %s but library %s\n", LOLDU_VERSION_STRING, loldu_version_string());
        return 1;
    }
    printf("libloldu %s, %d BLAS thread(s)\n", loldu_version_string(), loldu_get_num_threads());

    /* A "pretrained" nn.Linear(4, 6): weight 6 x 4 row-major, bias 6. */
    float weight[M * N], bias[M], x[B * N];
    for (int i = 0; i < M * N; i++) weight[i] = (float)((i * 7) % 11 - 5) / 4.0f;
    for (int i = 0; i < M; i++) bias[i] = 0.1f * (float)i;
    for (int i = 0; i < B * N; i++) x[i] = (float)(i % 5 - 2) / 2.0f;

    loldu_config config;
    CHECK(loldu_config_default(&config));
    config.rank = RANK;

    loldu_adapter *adapter = NULL;
    CHECK(loldu_adapter_create(&adapter, LOLDU_FLOAT32, M, N, weight, bias, &config));

    loldu_adapter_info info;
    CHECK(loldu_adapter_get_info(adapter, &info, sizeof info));
    printf("adapter %lld x %lld, rank %lld: %lld trainable parameters (z and sigma)\n",
           (long long)info.m, (long long)info.n, (long long)info.rank, (long long)info.num_trainable);

    /* Trainable parameters live in the adapter: z[0..rank-1], then sigma. */
    float *params = NULL, *grads = NULL;
    CHECK(loldu_params(adapter, (void **)&params, (void **)&grads));
    print_row("z", params, RANK);

    /* Forward; at initialisation the output is exactly the pretrained layer's. */
    float y[B * M], h[B * RANK];
    CHECK(loldu_forward(adapter, B, x, y, h));
    print_row("y[0]", y, M);

    /* Backward of the loss 0.5 |y|^2: dY = y. Gradients accumulate in the adapter. */
    float dx[B * N];
    CHECK(loldu_backward(adapter, B, x, y, dx, h));
    print_row("dz", grads, RANK);
    printf("dsig %9.5f\n", grads[RANK]);
    print_row("dx0", dx, N);

    /* One plain gradient step on z and sigma, then the loss again. */
    double before = 0, after = 0;
    for (int i = 0; i < B * M; i++) before += 0.5 * y[i] * y[i];
    for (int k = 0; k <= RANK; k++) params[k] -= 0.01f * grads[k];
    CHECK(loldu_zero_grad(adapter));
    CHECK(loldu_forward(adapter, B, x, y, NULL));
    for (int i = 0; i < B * M; i++) after += 0.5 * y[i] * y[i];
    printf("loss %.5f -> %.5f after one step\n", before, after);

    /* Mistakes are status codes with a message, never a crash. */
    config.rank = 9;
    loldu_adapter *bad = NULL;
    loldu_status s = loldu_adapter_create(&bad, LOLDU_FLOAT32, M, N, weight, bias, &config);
    printf("rank 9 on a 6 x 4 weight -> %s: %s\n", loldu_status_string(s), loldu_last_error());

    loldu_adapter_free(adapter);
    return after < before ? 0 : 1;
}
