#ifndef LOLDU_CLINEARALGEBRA_SHIM_H
#define LOLDU_CLINEARALGEBRA_SHIM_H
/* OpenBLAS's cblas.h also declares openblas_set_num_threads and friends. */
#include <cblas.h>
#include <lapacke.h>
#endif
