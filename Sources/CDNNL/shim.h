#ifndef LOLDU_CDNNL_SHIM_H
#define LOLDU_CDNNL_SHIM_H
/* oneDNN's C API, for its types only: libloldu loads libdnnl.so.2 with dlopen when it first
   needs it (see Sources/LoLDU/OneDNN.swift), so that the library works without it and so that
   oneDNN's OpenMP runtime is configured before it starts. Nothing here is linked. */
#include <oneapi/dnnl/dnnl.h>

/* Execution argument indices (macros built from other macros, which Swift does not import). */
static const int loldu_dnnl_arg_src = DNNL_ARG_SRC;
static const int loldu_dnnl_arg_weights = DNNL_ARG_WEIGHTS;
static const int loldu_dnnl_arg_dst = DNNL_ARG_DST;
static const int loldu_dnnl_arg_bias = DNNL_ARG_BIAS;
static const int loldu_dnnl_arg_scratchpad = DNNL_ARG_SCRATCHPAD;
#endif
