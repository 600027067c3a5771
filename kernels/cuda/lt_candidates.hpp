// Helpers for asking cuBLASLt's heuristic and choosing among its candidates, shared by the FP32/BF16 plans
// (kernels/cuda/cublaslt_matmul.cu) and the FP8 block-scaled ones (kernels/cuda/sm90_fp8_gemm_cublaslt.cu): the
// query's preference, a candidate forced by an environment variable (comparing candidates on the device), one
// configuration attribute, and the listing of a plan's candidates.
#pragma once
#include <cublasLt.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernels/cuda/cuda_check.hpp"
#include "runtime/error.hpp"

namespace moerl::cuda_detail {

constexpr int kMaxLtCandidates = 8;  // asked of the heuristic; a plain array (std::vector of the type crashes nvcc 13)

// The preference of a heuristic query: at most `workspace` bytes of workspace, and the minimum alignments (bytes)
// of cuBLAS's A, B, and C and D (one output).
inline void set_lt_preference(cublasLtMatmulPreference_t pref, uint64_t workspace, uint32_t align_a, uint32_t align_b,
                              uint32_t align_cd) {
  CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                    sizeof workspace));
  const uint32_t aligns[4] = {align_a, align_b, align_cd, align_cd};
  const cublasLtMatmulPreferenceAttributes_t attrs[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i)
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attrs[i], &aligns[i], sizeof aligns[i]));
}

// The candidate index (0-based among the usable ones) the variable `name` forces, -1 when unset. Callers read it
// once per process.
inline int forced_lt_candidate(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return -1;
  const int n = std::atoi(v);
  if (n < 0 || n >= kMaxLtCandidates)
    throw Error(std::string(name) + " must be 0 .. " + std::to_string(kMaxLtCandidates - 1) + ", got " + v);
  return n;
}

// One configuration attribute of a cuBLASLt algorithm (all of them fit an int32).
inline int32_t lt_config_of(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attribute) {
  int32_t value = 0;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attribute, &value, sizeof value, &written);
  return value;
}

// "<tag> <problem>: [i id .. tile .. splitk .. waves ..] ...", the chosen one starred, on stderr (configuration
// attributes 0 .. 8 of cublasLtMatmulAlgoConfigAttributes_t).
inline void print_lt_candidates(const char* tag, const std::string& problem,
                                const cublasLtMatmulHeuristicResult_t* results, int found, int chosen) {
  static const char* const names[9] = {"id", "tile", "splitk", "red", "swz", "opt", "stages", "inner", "cluster"};
  std::string line = std::string(tag) + " " + problem + ":";
  for (int i = 0; i < found; ++i) {
    line += " [" + std::to_string(i) + (i == chosen ? "*" : "");
    for (int a = 0; a < 9; ++a)
      line += std::string(" ") + names[a] + " " +
              std::to_string(lt_config_of(results[i].algo, static_cast<cublasLtMatmulAlgoConfigAttributes_t>(a)));
    line += " waves " + std::to_string(results[i].wavesCount) + "]";
  }
  std::fprintf(stderr, "%s\n", line.c_str());
}

}  // namespace moerl::cuda_detail
