#include "runtime/util/threads.hpp"

#include <omp.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

extern "C" void openblas_set_num_threads(int);

namespace moerl {

int resolve_threads(int recipe_threads) {
  if (recipe_threads > 0) return recipe_threads;
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    try {
      const int n = std::stoi(env);
      if (n > 0) return n;
    } catch (const std::exception&) {  // not a number: OpenMP ignores it too
    }
  }
  return static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
}

void use_threads(int recipe_threads) {
  const int threads = resolve_threads(recipe_threads);
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

}  // namespace moerl
