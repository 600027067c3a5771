// How many threads the CPU kernels use (OpenMP loops and OpenBLAS GEMMs).
#pragma once

namespace moerl {

// The count for a recipe's `threads` field: the field when > 0; else OMP_NUM_THREADS when it is set (so a
// user sharing a machine can say `OMP_NUM_THREADS=1 moerl run ...`); else every online core.
int resolve_threads(int recipe_threads);

// Sets OpenMP's and OpenBLAS's thread counts for the calling thread (OpenMP's count is per thread: each actor
// thread calls this before heavy work) to resolve_threads(recipe_threads).
void use_threads(int recipe_threads);

}  // namespace moerl
