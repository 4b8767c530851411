/*
 * loldu.h — LoLDU low-rank adaptation (Lower-Diag-Upper, arXiv 2410.13618) as a C library.
 *
 * A pretrained weight W (m × n, as torch.nn.Linear: m = out_features, n = in_features) is
 * factored once by LU with partial pivoting, W = P L D U. An adapter of rank r trains only the
 * r entries of a diagonal z (and optionally one scale σ):
 *
 *     W_eff = W_res + σ · P L_r diag(z) U_r,    W_res = W − σ₀ · P L_r diag(z_ref) U_r,
 *     y     = x W_effᵀ + b                      for a batch x of B rows (B × n).
 *
 * Conventions
 *   - Every matrix is row-major and contiguous: W and W_eff are m × n, x is B × n, y is B × m.
 *   - Two element types per adapter (see loldu_dtype):
 *       the element type, of W, the bias and every activation: x, y, dY, dX, W_eff, dW;
 *       the parameter type, of z, σ, their gradients, db, h, the optimiser state and the
 *       factors A, D_r, U_r, W_res: float for float32, bfloat16 and float16 adapters, double
 *       for float64 ones.
 *     Buffers are aligned for their type and owned by the caller. Each function says which
 *     buffers it reads, writes (overwrites) or accumulates into; an output must not share
 *     memory with another buffer of the same call (LOLDU_ERR_INVALID_ARGUMENT: no in-place
 *     forward or backward). The library copies W (unless
 *     borrowed, see loldu_config) and the bias at creation and keeps no other pointer to a
 *     caller buffer after a call returns.
 *   - Every function that can fail returns a loldu_status. On failure nothing is written to
 *     the outputs, and loldu_last_error() names the argument and what was expected.
 *   - No input makes a function crash: NULL or stale handles, a handle of another kind (an
 *     optimiser passed as an adapter), NULL buffers, bad sizes, unknown enum values and hostile
 *     files are all answered with a status; the free functions ignore what is not a live
 *     handle of their kind.
 *   - Files: only regular files are read or replaced (a FIFO, device, socket or directory where
 *     a file is expected is LOLDU_ERR_IO, without blocking); every file is replaced atomically
 *     (temporary file, fsync, rename) under an exclusive flock of its directory, so a failed or
 *     interrupted write leaves the previous file intact, and temporary files of killed writers
 *     are removed by the next write into that directory. A call that finds the directory locked
 *     by another process waits for it up to 30 s, then returns LOLDU_ERR_IO. A checkpoint save
 *     that fails removes the directory if it created it.
 *
 * Thread safety
 *   - Different adapters may be used from different threads at the same time.
 *   - On one adapter, loldu_forward(_bias), loldu_backward(_into), loldu_weight_backward(_into),
 *     loldu_effective_weight and loldu_merge may be called from several threads at once: they
 *     hold a lock of the adapter and run one at a time (as a framework's layer may be called
 *     from several inference threads). loldu_grouped_forward(_bias) and
 *     loldu_grouped_backward_into take no lock and only read the adapters they use: they may
 *     overlap those calls and each other. Every other function that takes an adapter (those
 *     that change its z, σ, state or accumulated gradients, loldu_grouped_backward included)
 *     must not overlap another call on that adapter from another thread. For parallel work on
 *     one base, clone it: the frozen factors are
 *     immutable, and loldu_adapter_clone() gives a second adapter that shares them read-only,
 *     with its own z, σ, gradients and caches.
 *   - loldu_last_error() is per thread.
 *   - fork(): the child may use objects made before the fork, unless another thread of the
 *     parent was inside a call on that adapter at the moment of the fork: the child's calls on
 *     it then return LOLDU_ERR_STATE (its state is unknown there), and it must be created or
 *     loaded again. A child does not keep the parent's checkpoint-directory locks. GNU OpenMP
 *     (under oneDNN) cannot start threads in a child once the parent started some, so a child
 *     runs oneDNN's products on one thread if the parent had loaded oneDNN (it does so when it
 *     first picks a GEMM library: at the first adapter or loldu_gemm_backend), or had called
 *     the library while another library's OpenMP (PyTorch's) was loaded; OpenBLAS restarts its
 *     own threads. A child forked while another thread was inside a product can block in its
 *     first one: fork while no thread computes, or start workers with exec (spawn).
 *
 * Threads: BLAS runs with loldu_set_num_threads() threads (OpenBLAS's default otherwise; OpenBLAS
 * splits each of its products as it sees fit); a oneDNN product takes one thread per 8 MFLOP,
 * so one below that runs on the calling thread alone, and where another library loaded OpenMP
 * first (PyTorch), at most the calling thread's OpenMP thread count. In a process that also
 * runs another thread pool (PyTorch, OpenMP), set it to that pool's size or to 1 per worker
 * process to avoid oversubscribing the cores.
 */
#ifndef LOLDU_H
#define LOLDU_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(LOLDU_BUILDING)
#  define LOLDU_API __declspec(dllexport)
#elif defined(_WIN32)
#  define LOLDU_API __declspec(dllimport)
#elif defined(__GNUC__) || defined(__clang__)
#  define LOLDU_API __attribute__((visibility("default")))
#else
#  define LOLDU_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------
 * Version
 * ------------------------------------------------------------------------------------- */

#define LOLDU_VERSION_MAJOR 0
#define LOLDU_VERSION_MINOR 2
#define LOLDU_VERSION_PATCH 0
#define LOLDU_VERSION_NUMBER (LOLDU_VERSION_MAJOR * 10000 + LOLDU_VERSION_MINOR * 100 + LOLDU_VERSION_PATCH)
#define LOLDU_VERSION_STRING "0.2.0"

/** @return the library's LOLDU_VERSION_NUMBER, to compare with the header's at run time. */
LOLDU_API unsigned loldu_version_number(void);

/** @return the library's version as "major.minor.patch" (static storage). */
LOLDU_API const char *loldu_version_string(void);

/* ---------------------------------------------------------------------------------------
 * Status codes and errors. The values are fixed and never renumbered.
 * ------------------------------------------------------------------------------------- */

typedef enum loldu_status {
    LOLDU_OK = 0,
    LOLDU_ERR_INVALID_ARGUMENT = 1, /* a value out of range, or an unknown enum value */
    LOLDU_ERR_NULL_POINTER = 2,     /* a required pointer is NULL */
    LOLDU_ERR_SHAPE = 3,            /* sizes that disagree, are negative or are too large */
    LOLDU_ERR_NOT_FINITE = 4,       /* NaN or ±Inf where finite values are required */
    LOLDU_ERR_DTYPE = 5,            /* element types that disagree */
    LOLDU_ERR_STATE = 6,            /* not allowed in the object's current state (e.g. merged) */
    LOLDU_ERR_OUT_OF_MEMORY = 7,
    LOLDU_ERR_INVALID_HANDLE = 8,   /* not a live handle of the expected kind (never created, freed, or another kind) */
    LOLDU_ERR_IO = 9,               /* a file could not be read or written */
    LOLDU_ERR_FORMAT = 10,          /* a file is malformed or of an unsupported version */
    LOLDU_ERR_MISMATCH = 11,        /* a checkpoint does not match the base weights */
    LOLDU_ERR_INTERNAL = 12,        /* a library bug or a LAPACK failure: please report it */
    LOLDU_ERR_CANCELLED = 13        /* a progress callback asked to stop (nothing was written) */
} loldu_status;

/** @return a short static description of `status` ("unknown status" for other values). */
LOLDU_API const char *loldu_status_string(int status);

/**
 * @return the message of the last failed call on this thread, naming the argument and what was
 * expected (e.g. "config.rank must be 0 (full rank) or in [1, min(m, n)] = [1, 64], got 65"), or "" if none.
 * Valid until the next failing call on the same thread. Successful calls do not clear it.
 */
LOLDU_API const char *loldu_last_error(void);

/* ---------------------------------------------------------------------------------------
 * Enumerations (passed as int32_t inside structs)
 * ------------------------------------------------------------------------------------- */

/**
 * Element types. Half-precision weights and activations are computed with float32 accumulation
 * and rounded once, to nearest even, on output; parameters and gradients are float32.
 *   LOLDU_BFLOAT16: uint16_t holding the top half of a float (PyTorch's torch.bfloat16). GEMMs
 *     run in bf16 on AMX-BF16 (through oneDNN); with AVX512-BF16 alone, in bf16 unless a
 *     product timed once per process ran 25% faster widened to float32; widened elsewhere (see
 *     loldu_gemm_backend and loldu_set_widened_half). Where bf16 GEMMs run in bf16, a training
 *     step's products all take bf16 operands (A, U_r, and what is formed in float32 on the way,
 *     rounded once: A·diag(c) of the W_eff it caches, dYᵀx on LOLDU_PATH_MERGED_WGRAD), while
 *     loldu_effective_weight, loldu_merge and the merges into files build W + ΔW from float32
 *     operands and round it once, and loldu_weight_backward multiplies float32 operands.
 *   LOLDU_FLOAT16: IEEE binary16 (uint16_t / _Float16). Widened to float32 for the GEMMs (oneDNN
 *     2.6 has no float16 kernels for x86): the memory of float16, the speed of float32.
 */
typedef enum loldu_dtype {
    LOLDU_FLOAT32 = 1,
    LOLDU_FLOAT64 = 2,
    LOLDU_BFLOAT16 = 3,
    LOLDU_FLOAT16 = 4
} loldu_dtype;

/** Initialisation of z; D_r are the first r pivots (the diagonal of U). */
typedef enum loldu_z_init {
    LOLDU_INIT_LU = 0,        /* z = D_r (default) */
    LOLDU_INIT_CONSTANT = 1,  /* every z_k = mean(D_r) */
    LOLDU_INIT_UNIFORM = 2,   /* U(-|μ|/2, |μ|/2), μ = mean(D_r) */
    LOLDU_INIT_NORMAL = 3,    /* N(mean(D_r), std(D_r)), std with divisor r - 1 (0 if r = 1) */
    LOLDU_INIT_S_UNIFORM = 4, /* U(-1, 1) */
    LOLDU_INIT_S_NORMAL = 5,  /* N(0, 1) */
    LOLDU_INIT_ONES = 6,
    LOLDU_INIT_ZEROS = 7
} loldu_z_init;

/** What the frozen residual removes from W: W_res = W − σ₀ · P L_r diag(z_ref) U_r. */
typedef enum loldu_residual {
    LOLDU_RESIDUAL_PIVOTS = 0, /* z_ref = D_r (the paper; default). Output unchanged at
                                  initialisation only for LOLDU_INIT_LU. */
    LOLDU_RESIDUAL_INIT = 1    /* z_ref = z₀: output unchanged at initialisation for every init */
} loldu_residual;

/**
 * How loldu_forward / loldu_backward compute. With A = P L_r, h = x U_rᵀ, g = dY A:
 *   FACTORED      y = x Wᵀ + σ-terms through h and A; dX likewise; dz from h and g.
 *   MERGED        y and dX through a cached W_eff (m × n, rebuilt when z or σ change);
 *                 dz from h and g.
 *   MERGED_WGRAD  y and dX through W_eff; dz = σ diag(Aᵀ (dYᵀ x) U_rᵀ) from the weight gradient.
 *   AUTO          (default) the cheapest of the three by FLOP count for the shape and batch
 *                 (see loldu_plan); a cached W_eff that is still valid is always used.
 * All paths compute the same values to rounding. AUTO's choice depends on the adapter's history
 * (the cache), so force a path where outputs must be reproducible bit for bit.
 */
typedef enum loldu_path {
    LOLDU_PATH_AUTO = 0,
    LOLDU_PATH_FACTORED = 1,
    LOLDU_PATH_MERGED = 2,
    LOLDU_PATH_MERGED_WGRAD = 3
} loldu_path;

/** Frozen quantities readable with loldu_get_factor, in the parameter type (P) or the element
 * type (E). */
typedef enum loldu_factor {
    LOLDU_FACTOR_LOWER = 0,    /* P: A = P L_r, m × rank: L_r's rows already permuted */
    LOLDU_FACTOR_DIAG = 1,     /* P: D_r, rank */
    LOLDU_FACTOR_UPPER = 2,    /* P: U_r, rank × n, unit upper trapezoidal */
    LOLDU_FACTOR_WEIGHT = 3,   /* E: the pretrained W, m × n, exactly as given */
    LOLDU_FACTOR_BIAS = 4,     /* E: the bias, m (LOLDU_ERR_STATE if the adapter has none) */
    LOLDU_FACTOR_RESIDUAL = 5  /* P: W_res = W − σ₀ A diag(z_ref) U_r, m × n */
} loldu_factor;

/* ---------------------------------------------------------------------------------------
 * Configuration
 * ------------------------------------------------------------------------------------- */

typedef struct loldu_config {
    uint32_t struct_size; /* sizeof(loldu_config); set by loldu_config_default */
    int32_t z_init;       /* loldu_z_init; default LOLDU_INIT_LU */
    int64_t rank;         /* r, in [1, min(m, n)]; 0 (default): full rank, min(m, n) (for
                             loldu_adapter_derive: the shared factors' rank) */
    double alpha;         /* σ = alpha / rank; 0 means alpha = rank, i.e. σ = 1 (default) */
    uint64_t seed;        /* for the random inits; default 0. Same seed, same z on any machine */
    int32_t residual;     /* loldu_residual; default LOLDU_RESIDUAL_PIVOTS */
    int32_t train_sigma;  /* 1: σ is trained too (r + 1 parameters, as in the paper; default);
                             0: σ gets no gradient and no optimiser update (it stays alpha / rank
                             unless set with loldu_set_sigma) */
    int32_t borrow_weight; /* 0: the adapter keeps a copy of W (default). 1: it keeps the caller's
                              pointer instead, like SQLITE_STATIC: no copy, no extra memory, but
                              the caller's W must stay unchanged and alive until every adapter
                              on it (and its clones) is freed. */
} loldu_config;

/**
 * Fills `config` with the defaults above. Always start from it: new fields get defaults.
 * @return LOLDU_OK, or LOLDU_ERR_NULL_POINTER.
 */
LOLDU_API loldu_status loldu_config_default(loldu_config *config);

/* ---------------------------------------------------------------------------------------
 * Adapters
 * ------------------------------------------------------------------------------------- */

typedef struct loldu_adapter loldu_adapter;

/**
 * Factors a pretrained weight and creates an adapter of rank config->rank.
 *
 * @param out     receives the new handle (set only on success); free it with loldu_adapter_free.
 * @param dtype   a loldu_dtype: the element type of `weight`, `bias` and of every activation
 *                later passed with this adapter (see Conventions for the parameter type).
 * @param m, n    out_features and in_features, each in [1, 2^31 − 1].
 * @param weight  read: W, m × n row-major; copied unless config->borrow_weight. Every element
 *                must be finite.
 * @param bias    read: m values, copied; or NULL for a layer without bias.
 * @param config  read: see loldu_config; NULL means the defaults.
 * @return LOLDU_OK; LOLDU_ERR_NOT_FINITE naming the first NaN/Inf element of W or the bias;
 *         LOLDU_ERR_INVALID_ARGUMENT for a bad rank, alpha or enum value; LOLDU_ERR_SHAPE;
 *         LOLDU_ERR_NULL_POINTER; LOLDU_ERR_OUT_OF_MEMORY (also when an address-space limit,
 *         RLIMIT_AS, leaves no room for the work buffer OpenBLAS maps on the process's first
 *         BLAS call: 128 MiB of address space; see README, Limits).
 *
 * Cost: one LU of the m × r panel and one triangular solve, O((m + n) r²), plus a copy of W
 * and its fingerprint (what loldu_checkpoint_apply compares), O(m n).
 * The elimination runs in double whatever the element type (W's values convert exactly) and
 * the factors are rounded to the element type once: the pivots are those of the first r steps
 * of LAPACK's dgetrf on W's values, up to the numerical rank (below).
 *
 * Rank-deficient W: a pivot that vanishes to the rounding of the elimination,
 * |D_j| ≤ 2^16·ε_double·max(m, r)·g (g: the largest magnitude in W[:, :r] and in the computed
 * U[:r, :r]), is degenerate: row j of U_r cannot be normalised and is set to e_jᵀ (1 on the
 * diagonal, 0 elsewhere); D_j is kept as computed. Every factor stays finite, the layer at
 * initialisation is still exactly W, and info.degenerate_pivots counts such pivots. Past the
 * first degenerate pivot the pivots are chosen among rounding noise: the factorisation is valid
 * but they may differ from another LAPACK's. W that is rank deficient as given (e.g. repeated
 * or zero columns, exact low-rank products) is caught in every element type; a float W rounded
 * from a low-rank product is not rank deficient as given, and its small pivots are kept. A
 * factor that overflows the element type (entries near FLT_MAX in float) is
 * LOLDU_ERR_NOT_FINITE, and an alpha that makes σ, σ·z₀ or the initial coefficients
 * σ·z₀ − σ₀·z_ref overflow (or σ round to 0) is LOLDU_ERR_INVALID_ARGUMENT.
 */
LOLDU_API loldu_status loldu_adapter_create(loldu_adapter **out, loldu_dtype dtype, int64_t m, int64_t n,
                                            const void *weight, const void *bias,
                                            const loldu_config *config);

/**
 * Creates a second adapter that shares `src`'s frozen factors (no copy of W) with its own copy
 * of the current z and σ, zero gradients, enabled and unmerged. The two may then be used from
 * different threads.
 */
LOLDU_API loldu_status loldu_adapter_clone(loldu_adapter **out, const loldu_adapter *src);

/**
 * Creates a new adapter on `base`'s frozen factors with its own configuration: rank (at most the
 * rank `base` was created with: LU factors are nested, so a rank-r adapter uses the first r
 * columns of A and rows of U_r), alpha, z init, residual mode, seed and train_sigma
 * (config->borrow_weight is checked, 0 or 1, and has no effect: the weight is `base`'s). O(r)
 * time and memory: no factorisation, no copy of W. Thousands of adapters on one base cost one set of factors plus,
 * each, z and σ (4·(r + 1) bytes in float) and a few hundred bytes; gradients and work space are
 * allocated on first use. Derived adapters compute, to rounding, what an adapter created directly
 * with that rank computes, and load its checkpoints (the pivots' fingerprint is of the first r).
 * @return LOLDU_ERR_INVALID_ARGUMENT for a rank above `base`'s or a bad configuration.
 */
LOLDU_API loldu_status loldu_adapter_derive(loldu_adapter **out, const loldu_adapter *base,
                                            const loldu_config *config);

/**
 * Creates an adapter of element type `dtype` that computes what `src` computes with its weight
 * and bias rounded to `dtype` (nearest even): `src`'s factorisation (A, D_r, U_r, pivots;
 * shared, not copied), copies of W and the bias rounded once, and a copy of `src`'s
 * configuration, z, σ and path;
 * zero gradients, enabled, unmerged. What a PyTorch layer computes under
 * torch.autocast(dtype=torch.bfloat16): the same parameters on the rounded weight. float32,
 * bfloat16 and float16 convert among themselves (their parameters are float); float64 does not.
 * Its checkpoints carry the fingerprint of `src`'s weight, the one factored: they load onto
 * adapters of that weight, and an adapter created on the rounded weight (another
 * factorisation) refuses them with LOLDU_ERR_MISMATCH.
 * @return LOLDU_ERR_INVALID_ARGUMENT for float64 on either side; LOLDU_ERR_NOT_FINITE if W
 *         overflows `dtype` (float16's range is ±65504).
 */
LOLDU_API loldu_status loldu_adapter_convert(loldu_adapter **out, const loldu_adapter *src, loldu_dtype dtype);

/** Frees an adapter. NULL is a no-op; so is anything that is not a live adapter handle. */
LOLDU_API void loldu_adapter_free(loldu_adapter *adapter);

typedef struct loldu_adapter_info {
    int32_t dtype;             /* loldu_dtype: the element type */
    int32_t param_dtype;       /* loldu_dtype of z, σ, gradients, h and the factors */
    int32_t backend;           /* loldu_backend that runs this adapter's GEMMs (float32 products
                                  of at most 16384 multiply-adds run on OpenBLAS whatever it says) */
    int32_t z_init;            /* loldu_z_init */
    int64_t m, n, rank;
    int64_t factor_rank;       /* the rank of the shared factors (≥ rank; see loldu_adapter_derive) */
    int64_t num_trainable;     /* rank, plus 1 if σ is trained */
    int64_t degenerate_pivots; /* see loldu_adapter_create */
    double alpha;              /* as resolved: alpha = rank when the config said 0 */
    double sigma;              /* current σ */
    uint64_t seed;
    int32_t residual;          /* loldu_residual */
    int32_t path;              /* loldu_path as set with loldu_set_path */
    int32_t has_bias, train_sigma, borrow_weight, enabled, merged;  /* borrow_weight: the
                                  factors keep the caller's W, not a copy (a derived or cloned
                                  adapter: its base's factors) */
    int64_t bytes_weight;      /* the copies of W (0 when borrowed) and of the bias */
    int64_t bytes_factors;     /* memory held for A, U_r, D_r, pivots (and GEMM copies of W, A, U_r
                                  in another type), shared with clones and derived adapters */
    int64_t bytes_state;       /* this adapter's z, σ, z_ref, gradients and bias gradient */
    int64_t bytes_merged;      /* the cached merged weight W_eff, if any (m × n) */
    int64_t bytes_scratch;     /* reusable work buffers (grow with the batch) */
    double init_change;        /* ‖W_eff − W‖_F / ‖W‖_F at creation: how much the initial z moved the
                                  pretrained weight. 0 for z_init LU or residual INIT; near 1 means the
                                  pretrained layer was replaced before training (e.g. a uniform init
                                  with alpha = rank and residual PIVOTS): use residual INIT, alpha = 1
                                  or z_init LU. Costs O((m + n)·rank²) when not 0. */
} loldu_adapter_info;

/**
 * Describes an adapter.
 * @param info_size sizeof(loldu_adapter_info) as the caller compiled it; the library checks it
 *        against its own, so that a header and library of different versions are caught.
 */
LOLDU_API loldu_status loldu_adapter_get_info(const loldu_adapter *adapter, loldu_adapter_info *info,
                                              size_t info_size);

/* ---------------------------------------------------------------------------------------
 * Trainable parameters and gradients
 * ------------------------------------------------------------------------------------- */

/** Copies z (rank values of the parameter type) into `z`. */
LOLDU_API loldu_status loldu_get_z(const loldu_adapter *adapter, void *z);

/**
 * Sets z from `z` (rank values of the parameter type, read). LOLDU_ERR_NOT_FINITE if a value,
 * or σ·z_k − σ₀·z_ref,k, is not finite; LOLDU_ERR_STATE while merged.
 */
LOLDU_API loldu_status loldu_set_z(loldu_adapter *adapter, const void *z);

/** Reads σ (converted to double). */
LOLDU_API loldu_status loldu_get_sigma(const loldu_adapter *adapter, double *sigma);

/**
 * Sets σ (rounded to the adapter's type), trained or not. LOLDU_ERR_NOT_FINITE if σ or any
 * σ·z_k − σ₀·z_ref,k is not finite; LOLDU_ERR_STATE while merged.
 */
LOLDU_API loldu_status loldu_set_sigma(loldu_adapter *adapter, double sigma);

/**
 * Stable pointers into the adapter, valid until loldu_adapter_free, for zero-copy views
 * (numpy, PyTorch parameters):
 * @param params if not NULL, receives the rank + 1 trainable values (parameter type): z[0..rank-1],
 *               then σ. Writing through it changes the adapter (do not write while merged).
 * @param grads  if not NULL, receives the rank + 1 gradients: dz[0..rank-1], then dσ
 *               (stays 0 when σ is not trained). Accumulated by loldu_backward and
 *               loldu_weight_backward, cleared by loldu_zero_grad. Allocated on the first request
 *               or backward (LOLDU_ERR_OUT_OF_MEMORY if that fails).
 */
LOLDU_API loldu_status loldu_params(loldu_adapter *adapter, void **params, void **grads);

/** Stable pointer to the accumulated bias gradient db (m values of the parameter type); NULL if
 * there is no bias. Allocated on the first request or backward. */
LOLDU_API loldu_status loldu_bias_grad(loldu_adapter *adapter, void **db);

/** Sets every accumulated gradient (dz, dσ, db) to zero. */
LOLDU_API loldu_status loldu_zero_grad(loldu_adapter *adapter);

/* ---------------------------------------------------------------------------------------
 * Frozen factors (for inspection and export)
 * ------------------------------------------------------------------------------------- */

/** Writes a frozen quantity (see loldu_factor for its shape) into `out`. */
LOLDU_API loldu_status loldu_get_factor(const loldu_adapter *adapter, loldu_factor which, void *out);

/**
 * Writes the first `rank` pivots as LAPACK's getrf reports them: 1-based, row i was
 * interchanged with row ipiv[i] at step i.
 */
LOLDU_API loldu_status loldu_get_pivots(const loldu_adapter *adapter, int32_t *ipiv);

/**
 * Writes the coefficients c = σ·z − σ₀·z_ref (rank values of the parameter type): the adapter's
 * update is ΔW = A·diag(c)·U_r (A = P·L_r and U_r from loldu_get_factor), so W_eff = W + ΔW.
 * This is a rank-r LoRA with lora_B = A·diag(c), lora_A = U_r and scaling 1 (loldu_export_lora);
 * adapters on one base differ only in c (c_1 + c_2 is the sum of two adapters' updates).
 */
LOLDU_API loldu_status loldu_get_coefficients(const loldu_adapter *adapter, void *c);

/* ---------------------------------------------------------------------------------------
 * Forward and backward
 * ------------------------------------------------------------------------------------- */

/**
 * y = x W_effᵀ + b.
 * @param batch B ≥ 0 rows (0 does nothing, and the buffers may then be NULL).
 * @param x     read: B × n.
 * @param y     written: B × m.
 * @param h     optional, written: h = x U_rᵀ (B × rank, parameter type). Pass the same buffer to
 *              loldu_backward with the same x to save recomputing it; NULL otherwise.
 * While disabled, computes the pretrained layer x Wᵀ + b exactly (under either residual mode);
 * while merged, x W_mergedᵀ + b.
 */
LOLDU_API loldu_status loldu_forward(loldu_adapter *adapter, int64_t batch, const void *x, void *y, void *h);

/**
 * loldu_forward with the layer's bias given for this call: y = x W_effᵀ + bias, the bias added
 * in the GEMM where the backend can (oneDNN), which saves the caller a pass over y. For a bias
 * the caller owns and may change or train between calls (a framework module's); the adapter
 * keeps no pointer to it.
 * @param bias  read during the call: m values of the element type; NULL is loldu_forward.
 * @return as loldu_forward; LOLDU_ERR_STATE if the adapter was created with a bias of its own
 *         (one bias per layer). loldu_backward's db is for the adapter's own bias: with a bias
 *         given per call, db = Σ_b dY is the caller's to compute.
 */
LOLDU_API loldu_status loldu_forward_bias(loldu_adapter *adapter, int64_t batch, const void *x, const void *bias,
                                          void *y, void *h);

/**
 * Backward of loldu_forward for the upstream gradient dY.
 * @param x   read: B × n, the forward's input.
 * @param dy  read: B × m.
 * @param dx  optional, written: dX = dY W_eff (B × n); NULL when not needed (first layer).
 * @param h   optional, read: the h that loldu_forward wrote for this x; NULL to recompute.
 * Accumulates dz = σ Σ_b (h ⊙ g), dσ = z · Σ_b (h ⊙ g) (when trained) into the adapter's
 * gradients (see loldu_params) and db = Σ_b dY into loldu_bias_grad's buffer.
 * Disabled or merged adapters do not depend on z: dz and dσ are left unchanged, dX goes
 * through the weight they compute with.
 */
LOLDU_API loldu_status loldu_backward(loldu_adapter *adapter, int64_t batch, const void *x, const void *dy,
                                      void *dx, const void *h);

/**
 * loldu_backward for frameworks that accumulate gradients themselves (PyTorch's autograd): this
 * call's dz and dσ are written to `grads` (rank + 1 values of the parameter type: dz, then dσ,
 * which is 0 when σ is not trained; zeros for a disabled or merged adapter) instead of being
 * accumulated into the adapter's gradients, and db is not computed. Everything else as
 * loldu_backward: one call per backward, no zero_grad, no copy.
 */
LOLDU_API loldu_status loldu_backward_into(loldu_adapter *adapter, int64_t batch, const void *x, const void *dy,
                                           void *dx, const void *h, void *grads);

/**
 * Weight space, for layers that use the weight in another way (convolution, embedding, fused
 * projections): writes the weight the layer currently computes with, W_eff (m × n), into
 * `w`; the pretrained W while disabled; the merged weight while merged. W_eff is W + ΔW
 * computed in float32 and rounded once to the element type (where bf16 GEMMs run in bf16, a
 * training step on a merged path multiplies by a W_eff built from bf16 operands, which may
 * differ from it in the last bit: see LOLDU_BFLOAT16).
 * @return LOLDU_ERR_NOT_FINITE, writing nothing, if W_eff does not fit the element type (a
 *         float16 value beyond 65504: σ or z too large).
 */
LOLDU_API loldu_status loldu_effective_weight(loldu_adapter *adapter, void *w);

/**
 * Weight space backward: maps a gradient dW with respect to W_eff (m × n, read) to
 * dz_k += σ s_k and dσ += Σ_k z_k s_k with s_k = (Aᵀ dW U_rᵀ)_kk (accumulated, as in
 * loldu_backward).
 * A disabled or merged adapter leaves its gradients unchanged.
 */
LOLDU_API loldu_status loldu_weight_backward(loldu_adapter *adapter, const void *dw);

/** loldu_weight_backward writing this call's dz, dσ to `grads` (rank + 1 values of the
 * parameter type; zeros for a disabled or merged adapter) instead of accumulating them. */
LOLDU_API loldu_status loldu_weight_backward_into(loldu_adapter *adapter, const void *dw, void *grads);

/* ---------------------------------------------------------------------------------------
 * Many adapters in one batch
 *
 * Adapters that share one base's frozen factors (clones and derived adapters of one base) serve
 * and train a batch whose rows belong to different adapters at one adapter's cost:
 *
 *     y_b = x_b Wᵀ + ((x_b U_Rᵀ) ⊙ c_{a(b)}) A_Rᵀ + b,   c_a = σ_a z_a − σ₀ z_ref,a
 *
 * (R: the largest rank used; a smaller adapter's c is padded with zeros). The batch takes one
 * pass of the factored path whatever the number of adapters, so a row's result never depends
 * on which other rows share its batch: it equals, to rounding, the row computed through its own
 * adapter alone on LOLDU_PATH_FACTORED (bit for bit when every adapter has rank R and the same
 * batch goes through it). A row of a disabled adapter, or with index -1, computes the
 * pretrained layer. A merged adapter computes with its merged coefficients (z cannot change
 * while merged) and gets no dz, dσ.
 * ------------------------------------------------------------------------------------- */

/**
 * y = x W_{a(b)}ᵀ + b for every row b, with row b's adapter adapters[rows[b]].
 * @param adapters `count` ≥ 1 adapters (read; repeats allowed) on the same factors; only those
 *                 the rows use (and adapters[0], whose factors the call uses) are looked at.
 * @param rows     read: batch values in [-1, count); -1 = the pretrained layer. Any order.
 * @param x        read: B × n (element type). @param y written: B × m (element type).
 * @return LOLDU_ERR_MISMATCH if a used adapter does not share adapters[0]'s factors;
 *         LOLDU_ERR_INVALID_ARGUMENT naming the first row out of range; nothing is written then.
 */
LOLDU_API loldu_status loldu_grouped_forward(loldu_adapter *const *adapters, size_t count, int64_t batch,
                                             const int32_t *rows, const void *x, void *y);

/**
 * loldu_grouped_forward with the layer's bias given for this call (m values of the element
 * type, read during the call; NULL is loldu_grouped_forward), as loldu_forward_bias:
 * LOLDU_ERR_STATE if the adapters' factors hold a bias of their own.
 */
LOLDU_API loldu_status loldu_grouped_forward_bias(loldu_adapter *const *adapters, size_t count, int64_t batch,
                                                  const int32_t *rows, const void *x, const void *bias, void *y);

/**
 * Backward of loldu_grouped_forward: writes dX (B × n, optional) for every row, and accumulates
 * into each adapter its dz, dσ (enabled, unmerged adapters) and db from its own rows only, so
 * that several adapters train in one batch (an optimiser may then step any subset of them).
 * Same arguments and errors as loldu_grouped_forward; dy is B × m.
 */
LOLDU_API loldu_status loldu_grouped_backward(loldu_adapter *const *adapters, size_t count, int64_t batch,
                                              const int32_t *rows, const void *x, const void *dy, void *dx);

/**
 * loldu_grouped_backward for frameworks that accumulate gradients themselves: `grads` holds
 * `count` pointers; for each adapters[i] that a row uses, grads[i] (rank_i + 1 values of the
 * parameter type, or NULL to skip it) receives this call's dz, dσ (zeros for a disabled or
 * merged adapter) instead of the adapter's own gradients; db is not computed. Entries of
 * adapters no row uses are not touched.
 */
LOLDU_API loldu_status loldu_grouped_backward_into(loldu_adapter *const *adapters, size_t count, int64_t batch,
                                                   const int32_t *rows, const void *x, const void *dy, void *dx,
                                                   void *const *grads);

/* ---------------------------------------------------------------------------------------
 * Merge, enable, compute path
 * ------------------------------------------------------------------------------------- */

/**
 * Bakes the current update into a merged weight W_eff (m × n, held by the adapter) that every
 * later call computes with, until loldu_unmerge. W is kept, so unmerging is exact. Changing z
 * or σ is refused while merged (LOLDU_ERR_STATE). Merging a merged adapter is a no-op. A merged
 * weight that would not be finite in the element type (float16 ends at 65504) is refused
 * (LOLDU_ERR_NOT_FINITE), as PEFT's safe_merge.
 */
LOLDU_API loldu_status loldu_merge(loldu_adapter *adapter);

/** Returns to computing with the live z and σ. A no-op when not merged. */
LOLDU_API loldu_status loldu_unmerge(loldu_adapter *adapter);

/**
 * enabled = 0: the adapter computes the original pretrained layer, y = x Wᵀ + b exactly, under
 * either residual mode (W_res + σ₀ A diag(z_ref) U_r is W); z and σ are kept and get no gradient.
 * enabled = 1 (the initial state): the adapted layer.
 */
LOLDU_API loldu_status loldu_set_enabled(loldu_adapter *adapter, int enabled);

/** Forces a compute path (LOLDU_PATH_AUTO to choose automatically again). */
LOLDU_API loldu_status loldu_set_path(loldu_adapter *adapter, loldu_path path);

/**
 * The path LOLDU_PATH_AUTO takes for a training step on `batch` rows: the cheapest by FLOP count
 * (see docs/design.md), given whether the caller keeps h from forward to backward (`keeps_h` 0/1).
 * Reports the forced path when one is set.
 */
LOLDU_API loldu_status loldu_plan(const loldu_adapter *adapter, int64_t batch, int keeps_h, loldu_path *path);

/* ---------------------------------------------------------------------------------------
 * Optimisers: torch.optim's update rules over the z and σ of any number of adapters
 * ------------------------------------------------------------------------------------- */

typedef enum loldu_optimizer_kind {
    LOLDU_SGD = 0,   /* torch.optim.SGD: momentum, dampening, Nesterov, L2 weight decay */
    LOLDU_ADAM = 1,  /* torch.optim.Adam: bias-corrected, L2 weight decay added to the gradient */
    LOLDU_ADAMW = 2  /* torch.optim.AdamW: decoupled weight decay */
} loldu_optimizer_kind;

/**
 * Learning-rate schedules, as a factor on the base rates (Hugging Face transformers'
 * get_*_schedule_with_warmup). Step t = 0, 1, … counts completed optimiser steps; step t uses
 *   warm-up (t < warmup_steps):  t / warmup_steps
 *   LINEAR:   max(0, (total_steps − t) / (total_steps − warmup_steps))
 *   COSINE:   max(0, ½ (1 + cos(π p))), p = (t − warmup_steps) / (total_steps − warmup_steps)
 *   CONSTANT: 1 (after the warm-up, if any)
 */
typedef enum loldu_schedule {
    LOLDU_SCHEDULE_CONSTANT = 0,
    LOLDU_SCHEDULE_LINEAR = 1,
    LOLDU_SCHEDULE_COSINE = 2
} loldu_schedule;

typedef struct loldu_optimizer_config {
    uint32_t struct_size;       /* sizeof(loldu_optimizer_config); set by the defaults function */
    int32_t kind;               /* loldu_optimizer_kind */
    double lr;                  /* base learning rate of every z (> 0) */
    double lr_sigma;            /* base learning rate of σ; < 0 means "same as lr" (default -1) */
    double weight_decay;        /* for z (≥ 0) */
    double weight_decay_sigma;  /* for σ (≥ 0, default 0) */
    double momentum;            /* SGD (≥ 0) */
    double dampening;           /* SGD (≥ 0) */
    int32_t nesterov;           /* SGD: 0 or 1; needs momentum > 0 and dampening = 0 */
    int32_t schedule;           /* loldu_schedule */
    double beta1, beta2, eps;   /* Adam, AdamW: in [0, 1), [0, 1), > 0 */
    double max_grad_norm;       /* > 0: clip the global norm of all gradients first (0 = off) */
    int64_t warmup_steps;       /* in [0, 2^53] */
    int64_t total_steps;        /* in [0, 2^53]; LINEAR, COSINE: > warmup_steps */
} loldu_optimizer_config;

/**
 * Fills `config` with torch.optim's defaults for `kind`: lr 1e-3; AdamW weight_decay 1e-2,
 * others 0; betas (0.9, 0.999), eps 1e-8; momentum 0; constant schedule; no clipping.
 */
LOLDU_API loldu_status loldu_optimizer_config_default(loldu_optimizer_config *config, loldu_optimizer_kind kind);

typedef struct loldu_optimizer loldu_optimizer;

/**
 * Creates an optimiser over `count` different adapters, 1 ≤ count ≤ 2^24 (`adapters` read; the optimiser keeps
 * them alive until it is freed; adapters of any element types may be mixed). Its state
 * (momentum, first and second moments) is in each adapter's parameter type (float32; float64 for
 * float64 adapters), like z and σ.
 */
LOLDU_API loldu_status loldu_optimizer_create(loldu_optimizer **out, const loldu_optimizer_config *config,
                                              loldu_adapter *const *adapters, size_t count);

/** Frees an optimiser. NULL is a no-op; so is anything that is not a live optimiser handle. */
LOLDU_API void loldu_optimizer_free(loldu_optimizer *optimizer);

/**
 * One optimisation step from the gradients accumulated in the adapters: clip (if configured,
 * scaling the stored gradients as torch.nn.utils.clip_grad_norm_ does), then update every z and
 * trainable σ at the scheduled rates. Gradients are not cleared (call loldu_optimizer_zero_grad).
 * All or nothing: a failing step changes no parameter, gradient, state buffer or step count.
 * @param grad_norm optional, written: the global gradient norm before clipping.
 * @return LOLDU_ERR_STATE if an adapter is merged, or after 2^53 steps;
 *         LOLDU_ERR_NOT_FINITE if a gradient is NaN or infinite, or if the step would make a
 *         z_k or σ (or σ·z_k − σ₀·z_ref,k) NaN or infinite (a learning rate far too large),
 *         or a value of the optimiser's state (a gradient whose square overflows the parameter
 *         type): the message names the adapter and the value, and nothing is changed.
 */
LOLDU_API loldu_status loldu_optimizer_step(loldu_optimizer *optimizer, double *grad_norm);

/** loldu_zero_grad on every adapter of the optimiser. */
LOLDU_API loldu_status loldu_optimizer_zero_grad(loldu_optimizer *optimizer);

/** The learning rates the next step will use (after the schedule), and the steps taken so far. */
LOLDU_API loldu_status loldu_optimizer_get_lr(const loldu_optimizer *optimizer, double *lr, double *lr_sigma);
LOLDU_API loldu_status loldu_optimizer_get_step(const loldu_optimizer *optimizer, int64_t *steps);

/**
 * Saves the optimiser's state (step count, moments, configuration, and each adapter's rank and
 * element type) to a safetensors file, atomically: a failed or interrupted save leaves any
 * previous file intact. A symbolic link at `path` is followed; a path that exists and is not a
 * regular file is LOLDU_ERR_IO.
 */
LOLDU_API loldu_status loldu_optimizer_save(const loldu_optimizer *optimizer, const char *path);

/**
 * Restores a state saved by loldu_optimizer_save for the same configuration and adapters
 * (same count, ranks, element types); anything else is LOLDU_ERR_MISMATCH naming what differs,
 * and changes nothing. The file is hostile until proven otherwise: every count in it is
 * range-checked (steps in [0, 2^53]) and a malformed one is LOLDU_ERR_FORMAT. A run resumed this
 * way, with z and σ restored by loldu_checkpoint_apply, continues bit for bit as if it had never
 * stopped.
 */
LOLDU_API loldu_status loldu_optimizer_load(loldu_optimizer *optimizer, const char *path);

/* ---------------------------------------------------------------------------------------
 * Checkpoints: a directory like PEFT's save_pretrained
 *   adapter_model.safetensors  per layer NAME: "NAME.loldu_z" (rank values) and
 *                              "NAME.loldu_sigma" (1 value), in the parameter type (float32;
 *                              float64 for float64 adapters);
 *                              the header's __metadata__ holds fingerprints of each layer's base
 *                              weight and pivots. About 4·(rank + 1) bytes per layer (float).
 *   adapter_config.json        rank, alpha, z init, residual mode, shapes, target names,
 *                              library version.
 * Names are the layers' names in the model, e.g. "encoder.layer.0.attention.self.query":
 * 1 to 512 bytes of UTF-8 without control characters, all different.
 * ------------------------------------------------------------------------------------- */

/**
 * Saves `count` ≥ 1 adapters under `names` into directory `dir` (created if missing; its parent
 * must exist), atomically as a whole: after a failure, a kill or a full disk at any moment,
 * loldu_checkpoint_open reads exactly the previous checkpoint or exactly the new one.
 *
 * How: both files carry the same random generation id. Under an exclusive flock of `dir`, the
 * model file and the new config (as ".adapter_config.json.pending") are written and fsynced
 * first; then the model file and the config are renamed into place, and the directory synced
 * after each rename. An interruption between the two renames leaves the new model file with its
 * config still pending; loldu_checkpoint_open takes the config whose generation matches the
 * model file's, and the next save completes the rename (or discards a pending config that never
 * took effect) and removes temporary files of killed saves. This holds on every local POSIX
 * file system (rename is atomic); over NFS it holds as far as the server's rename is atomic and
 * flock works there. Tools that read only adapter_config.json see the old config until then.
 *
 * @return LOLDU_ERR_NOT_FINITE naming the layer if a z_k or σ is NaN or infinite (written
 *         through loldu_params): a checkpoint holds finite values only, and nothing is written;
 *         LOLDU_ERR_STATE naming the layer if its z or σ were written while it is merged
 *         (through loldu_params memory): they are not what its merged weight computes.
 */
LOLDU_API loldu_status loldu_checkpoint_save(const char *dir, loldu_adapter *const *adapters,
                                             const char *const *names, size_t count);

typedef struct loldu_checkpoint loldu_checkpoint;

/**
 * Reads and validates a checkpoint directory. Every file is treated as hostile: truncated files,
 * bad headers, wrong dtypes or shapes, bad JSON, missing or duplicate tensors, non-finite values
 * and files of two different saves are LOLDU_ERR_FORMAT with a message saying what and where;
 * an unreadable file, or a FIFO, device or directory in a file's place, is LOLDU_ERR_IO. Takes a
 * shared flock of `dir` while reading, so a concurrent save is seen whole or not at all.
 */
LOLDU_API loldu_status loldu_checkpoint_open(loldu_checkpoint **out, const char *dir);

/** Frees a checkpoint. NULL is a no-op; so is anything that is not a live checkpoint handle. */
LOLDU_API void loldu_checkpoint_free(loldu_checkpoint *checkpoint);

/** The number of layers, and the name of layer `index` (valid until loldu_checkpoint_free). */
LOLDU_API loldu_status loldu_checkpoint_count(const loldu_checkpoint *checkpoint, size_t *count);
LOLDU_API loldu_status loldu_checkpoint_name(const loldu_checkpoint *checkpoint, size_t index, const char **name);

/**
 * What to create the layer's adapter with: its element type, base shape (m, n) and
 * configuration (any output pointer may be NULL). LOLDU_ERR_MISMATCH if there is no such layer.
 */
LOLDU_API loldu_status loldu_checkpoint_layer(const loldu_checkpoint *checkpoint, const char *name,
                                              loldu_dtype *dtype, int64_t *m, int64_t *n, loldu_config *config);

/**
 * Sets z and σ of `adapter` from layer `name`, both or neither (LOLDU_ERR_NOT_FINITE if σ·z_k
 * would overflow the adapter's type, changing nothing). The adapter's base weight and pivots must have the
 * fingerprints that were saved (the weight's is computed when the base is created: a borrowed
 * weight must not change afterwards), its shape, parameter type (float32 or float64: a
 * checkpoint saved on a bf16 model applies to its float32 copy) and configuration (rank, alpha,
 * z_init, residual, seed, train_sigma: loldu_checkpoint_layer's) must match: otherwise
 * LOLDU_ERR_MISMATCH naming the difference (nothing is changed). Outputs are then bit for bit those of the saved
 * adapter on the same compute path (same machine, BLAS and thread count: some BLAS kernels sum
 * in an order that depends on the threads). LOLDU_PATH_AUTO may reuse a merged
 * weight cached by earlier calls, which agrees to rounding only: fix the path with
 * loldu_set_path where bit-for-bit comparisons matter.
 */
LOLDU_API loldu_status loldu_checkpoint_apply(const loldu_checkpoint *checkpoint, const char *name,
                                              loldu_adapter *adapter);

/**
 * Layer `name`'s saved values: its z (config.rank values, exactly, as doubles) and σ, and the
 * fingerprints of the base weight and pivots it was saved on (16 hex digits and a NUL, written
 * to 17-byte buffers). Any output may be NULL. LOLDU_ERR_MISMATCH if there is no such layer.
 */
LOLDU_API loldu_status loldu_checkpoint_values(const loldu_checkpoint *checkpoint, const char *name, double *z,
                                               double *sigma, char *weight_fingerprint, char *pivots_fingerprint);

/**
 * Creates layer `name`'s adapter on its base weight (and bias, if the file has one) in the model
 * directory `base_dir`, and applies the checkpoint to it (loldu_checkpoint_apply): what a server
 * needs to load a base model's files and an adapter. The adapter's element type is the tensor's
 * (F32, F64, BF16 or F16; a weight of more than 2 dimensions, a convolution's, is taken as
 * shape[0] × the rest).
 *
 * base_dir holds the weights as transformers writes them: "model.safetensors", or shards listed in
 * "model.safetensors.index.json"; only the tensors used are read. Layer NAME's weight is
 * the tensor (1) "NAME.weight"; else (2) the one tensor ending in ".NAME.weight" (the file's names
 * carry a prefix such as "bert."); else (3) NAME without its first components, as few as possible
 * (the layer names carry a prefix the file lacks). Its bias is the same name ending in ".bias".
 *
 * @return LOLDU_ERR_MISMATCH naming the layer if no tensor matches, the shape differs, or the
 *         weight's fingerprint is not the saved one (checked before the factorisation);
 *         a bias tensor of another length is a mismatch too; LOLDU_ERR_DTYPE if the weight or
 *         bias tensor is not F32, F64, BF16 or F16; LOLDU_ERR_IO or
 *         LOLDU_ERR_FORMAT for missing, unreadable or corrupt model files.
 */
LOLDU_API loldu_status loldu_checkpoint_create(loldu_adapter **out, const loldu_checkpoint *checkpoint,
                                               const char *name, const char *base_dir);

/**
 * Writes merged weights for serving without this library: a safetensors file with, per layer,
 * "NAME.weight" = W_eff (m × n) and "NAME.bias" when the layer has one, in the adapter's element
 * type. Written atomically (see loldu_optimizer_save for links and special files).
 */
LOLDU_API loldu_status loldu_export_merged(const char *path, loldu_adapter *const *adapters,
                                           const char *const *names, size_t count);

/* ---------------------------------------------------------------------------------------
 * Leaving the library: adapters as a standard LoRA, and merged model files
 * ------------------------------------------------------------------------------------- */

/** How PEFT represents a layer in a LoRA export. */
typedef enum loldu_lora_kind {
    LOLDU_LORA_LINEAR = 0,    /* nn.Linear (m = out, n = in): lora_A.weight R × n, lora_B.weight m × R */
    LOLDU_LORA_EMBEDDING = 1, /* nn.Embedding (m = num_embeddings, n = dim): lora_embedding_A R × m,
                                 lora_embedding_B n × R */
    LOLDU_LORA_CONV = 2       /* nn.Conv1d/2d/3d, W reshaped to out × (in · kernel): lora_A.weight
                                 R × in × kernel, lora_B.weight out × R × 1…; exact for groups = 1,
                                 dilation = 1 and zero padding (PEFT's lora_A has no dilation) */
} loldu_lora_kind;

typedef struct loldu_lora_layer {
    int32_t kind;        /* loldu_lora_kind */
    int32_t kernel_dims; /* LOLDU_LORA_CONV: the number of kernel sizes, 1 to 3 */
    int64_t kernel[3];   /* LOLDU_LORA_CONV: the kernel size; n must be in_channels · their product */
} loldu_lora_layer;

typedef struct loldu_lora_options {
    uint32_t struct_size;                 /* sizeof(loldu_lora_options); set by the defaults function */
    int32_t dtype;                        /* the tensors' loldu_dtype; default LOLDU_FLOAT32 */
    const char *base_model_name_or_path;  /* written to adapter_config.json (a hub id or a
                                             directory); NULL (default) writes null */
    const loldu_lora_layer *layers;       /* one per adapter, or NULL (default): all LOLDU_LORA_LINEAR */
    int32_t replace;                      /* 1: replace an earlier export at dir, as a whole; 0 (default):
                                             dir must not exist, or be an empty directory */
} loldu_lora_options;

/** Fills `options` with the defaults above. */
LOLDU_API loldu_status loldu_lora_options_default(loldu_lora_options *options);

/**
 * Writes `count` ≥ 1 adapters under `names` (their module names in the model that will load them)
 * as a PEFT LoRA directory `dir`: exact, since ΔW = A·diag(c)·U_r (loldu_get_coefficients) is a
 * rank-r LoRA with lora_B = A·diag(c) and lora_A = U_r. Layers of smaller rank are padded with
 * zeros to the largest rank R, and lora_alpha = r = R (scaling 1), which PEFT, vLLM and llama.cpp's
 * convert_lora_to_gguf.py all read the same way.
 *   adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules (the names), bias
 *                              "none", base_model_name_or_path, and PEFT's other keys
 *   adapter_model.safetensors  "base_model.model.NAME.lora_A.weight" and "...lora_B.weight"
 *                              (embeddings: "...lora_embedding_A", "...lora_embedding_B")
 * The directory appears whole or not at all: written under a temporary name beside `dir`, then
 * renamed (an interrupted export leaves nothing at `dir`; the next one removes its remains).
 * Replacing (options->replace) swaps the old export out in one step, and only an export: a
 * directory holding other files is refused (LOLDU_ERR_IO), never deleted.
 *
 * @param options NULL for the defaults.
 * @return LOLDU_ERR_NOT_FINITE naming the layer if its z or σ is not finite, or if W + lora_B·lora_A
 *         (the weight PEFT computes with, as loldu_merge) is not finite in the adapter's element
 *         type, or naming the tensor if a value is beyond the range of options->dtype;
 *         LOLDU_ERR_STATE naming the layer if its z or σ were written while it is merged (as
 *         loldu_checkpoint_save); LOLDU_ERR_INVALID_ARGUMENT if the last component of dir is
 *         ".", "..", or longer than its file system takes (checked first); LOLDU_ERR_IO if dir
 *         exists and is not an empty directory (without replace) or cannot be written.
 */
LOLDU_API loldu_status loldu_export_lora(const char *dir, loldu_adapter *const *adapters, const char *const *names,
                                         size_t count, const loldu_lora_options *options);

/**
 * Progress of a long call: `done` of `total` bytes written, `tensor` the tensor just written
 * (valid during the call). Called from the calling thread. Return 0 to go on, anything else to
 * stop: the call then fails with LOLDU_ERR_CANCELLED and leaves no output.
 */
typedef int (*loldu_progress_fn)(void *user, uint64_t done, uint64_t total, const char *tensor);

typedef struct loldu_merge_options {
    uint32_t struct_size;       /* sizeof(loldu_merge_options); set by the defaults function */
    int32_t dtype;              /* 0 (default): each tensor keeps its type; LOLDU_FLOAT32, LOLDU_BFLOAT16
                                   or LOLDU_FLOAT16: every F32, BF16 and F16 tensor is converted to it,
                                   and config.json's torch_dtype says so */
    loldu_progress_fn progress; /* called after each tensor, or NULL (default) */
    void *user;                 /* passed to progress */
} loldu_merge_options;

/** Fills `options` with the defaults above. */
LOLDU_API loldu_status loldu_merge_options_default(loldu_merge_options *options);

/**
 * Merges every layer of `checkpoint` into a copy of the model directory `base_dir` (layout and
 * names as in loldu_checkpoint_create), written to the new directory `out_dir`: the same weight
 * files (one, or the same shards and index), tensor names, order and metadata, with each adapted
 * weight replaced by W + A·diag(c)·U_r, computed in float32 (float64 for F64 tensors) and rounded
 * once to the output type. config.json, the tokenizer and every other file are copied, except
 * hidden ones and weights in other formats (*.bin, *.pt, *.onnx, ...), which would still hold the
 * unmerged weights; *.safetensors files in subdirectories (other modules' weights, such as
 * sentence-transformers' 2_Dense) are copied. transformers' from_pretrained(out_dir) then loads
 * the adapted model.
 *
 * Tensors are read (not mapped) one at a time, and the ones copied in pieces of 8 MiB: memory
 * stays near the largest adapted tensor and its factors, whatever the model's size, and a shard
 * truncated by another process during the merge is LOLDU_ERR_FORMAT, not a SIGBUS. Every layer
 * is matched and its base weight's fingerprint checked before anything is written. An embedding
 * matrix (vocab_size rows, in config.json or its text_config) of a model that may tie its input
 * and output embeddings (tie_word_embeddings not false, and an architecture other than a task
 * head or the bare model of its model_type, or none named) is refused,
 * LOLDU_ERR_INVALID_ARGUMENT: merged, it would change both, the adapter one. config.json is
 * copied as it is, NaN / Infinity included (rewritten only for options->dtype). A value that
 * options->dtype cannot hold (beyond float16's 65504) is LOLDU_ERR_NOT_FINITE naming the tensor. `out_dir` appears whole
 * or not at all (see loldu_export_lora): a failure (a full disk, a corrupt shard, a weight that
 * is not the saved one) or a kill leaves no output.
 *
 * @param options NULL for the defaults.
 * @return LOLDU_ERR_INVALID_ARGUMENT for an out_dir named ".", "..", or longer than its file
 *         system takes (checked first); LOLDU_ERR_IO if out_dir exists and is not an empty
 *         directory; as loldu_checkpoint_create for the model files.
 */
LOLDU_API loldu_status loldu_merge_model(const char *out_dir, const char *base_dir, const loldu_checkpoint *checkpoint,
                                         const loldu_merge_options *options);

/* ---------------------------------------------------------------------------------------
 * Threads
 * ------------------------------------------------------------------------------------- */

/**
 * Sets the number of BLAS threads for the whole process (≥ 1; OpenBLAS caps it at the maximum
 * it was built for, which loldu_get_num_threads then reports). LOLDU_ERR_OUT_OF_MEMORY, changing
 * nothing, when an address-space limit (RLIMIT_AS, ulimit -v) leaves no room for the work
 * buffers (128 MiB of address space each) of the threads OpenBLAS would start.
 */
LOLDU_API loldu_status loldu_set_num_threads(int threads);

/** @return the number of BLAS threads. */
LOLDU_API int loldu_get_num_threads(void);

/* ---------------------------------------------------------------------------------------
 * GEMM libraries
 * ------------------------------------------------------------------------------------- */

/** Which library multiplies an element type (chosen per CPU, once per process). */
typedef enum loldu_backend {
    LOLDU_BACKEND_OPENBLAS = 1, /* OpenBLAS (float64; float32 unless OpenBLAS picked kernels for
                                   an older CPU than this one) */
    LOLDU_BACKEND_ONEDNN = 2,   /* oneDNN: bfloat16 on CPUs with bf16 units (AVX512-BF16, AMX);
                                   float32 where OpenBLAS's kernels were mis-detected */
    LOLDU_BACKEND_WIDENED = 3   /* half-precision operands widened to float32, then float32's */
} loldu_backend;

/**
 * The backend adapters of `dtype` created now get, and a description of the libraries and CPU
 * features behind it (static storage), e.g. "oneDNN 2.6.3, ISA avx512_core_bf16".
 * @param description optional, written.
 * @return LOLDU_OK; LOLDU_ERR_INVALID_ARGUMENT for an unknown dtype; LOLDU_ERR_OUT_OF_MEMORY
 *         when the choice would make the process's first BLAS call (bfloat16 may time a product)
 *         and an address-space limit leaves no room for OpenBLAS's work buffer.
 */
LOLDU_API loldu_status loldu_gemm_backend(loldu_dtype dtype, loldu_backend *backend, const char **description);

/**
 * widened = 1: half-precision adapters created from now on widen to float32 even where the CPU
 * multiplies bf16 natively (to compare, or to test that path); 0: back to the CPU's choice.
 * Existing adapters keep theirs (loldu_adapter_info.backend).
 */
LOLDU_API loldu_status loldu_set_widened_half(int widened);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LOLDU_H */
