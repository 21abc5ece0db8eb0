// The per-ISA kernel table. Each instruction-set file (isa_scalar.cpp,
// isa_avx2.cpp, isa_avx512.cpp, isa_avx512bf16.cpp) fills one; dispatch.cpp
// picks one at run time.
//
// Reduction contract, shared by every ISA so that all of them give bitwise
// identical results: element k of a chunk is accumulated, in float64, into lane
// k % 16; the 16 lanes are then folded by a fixed tree (8, 4, 2, 1). Squares are
// computed as a separate multiply and add, never an FMA: for float32 and 16-bit
// inputs the float64 square is exact, so the order above fixes every bit.
#pragma once

#include <cstdint>

#include "core/partial.h"
#include "core/types.h"

namespace gradclip::cpu {

constexpr int kLanes = 16;

// How far ahead the streaming loops prefetch (why: kernels_impl.h; the
// measurements: bench/README.md). NormStream prefetches the first kPrefetchBytes of each small
// tensor itself, the part the kernels' own prefetches never cover.
constexpr int64_t kPrefetchBytes = 2048;

// One contiguous block of one dtype; `n` may be anything from 0 up. `extent`
// (>= n) is how many elements of the same tensor start at x: the kernels
// prefetch ahead up to there and no further (see kernels_impl.h).
using ReduceFn = double (*)(const void* x, int64_t n, int64_t extent);
using ScaleFn = void (*)(void* x, int64_t n, int64_t extent, double coef);
// Returns true when at least one element was outside [lo, hi] (and so rewritten).
using ClampFn = bool (*)(void* x, int64_t n, int64_t extent, double lo, double hi);

struct IsaKernels {
  const char* name;
  ReduceFn sum_squares[kNumDTypes];
  ReduceFn sum_abs[kNumDTypes];
  ReduceFn max_abs[kNumDTypes];  // NaN if any element is NaN
  ScaleFn scale[kNumDTypes];     // x *= coef, in float32 for 16-bit/float32 data, float64 for float64
  ClampFn clamp[kNumDTypes];     // x = min(max(x, lo), hi); a NaN keeps its bits; writes only changed blocks
};

const IsaKernels& scalar_kernels();
#if defined(GRADCLIP_HAVE_AVX2)
const IsaKernels& avx2_kernels();
#endif
#if defined(GRADCLIP_HAVE_AVX512)
const IsaKernels& avx512_kernels();
const IsaKernels& avx512bf16_kernels();
#endif

// Fixed-tree fold of the 16 lanes (the second half of the contract above).
static inline double fold_sum(double* lanes) {
  for (int step = kLanes / 2; step >= 1; step /= 2)
    for (int k = 0; k < step; ++k) lanes[k] += lanes[k + step];
  return lanes[0];
}

}  // namespace gradclip::cpu
