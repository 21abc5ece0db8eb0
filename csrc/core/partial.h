// Partial power sums that survive overflow and underflow, and how they fold:
// one definition for the CUDA kernels (per-block partials, folded on the
// device) and the host (power sums combined across devices or processes, the
// seam of the engine: engine/engine.h).
//
// A partial stands for sum * base^p (sum * base for L1): its elements were
// divided by `base` before their powers were summed. base is 1 unless the
// plain sum overflowed or underflowed; then it is the rescue's base
// (core/norm_rescue.h). For the inf norm, sum is the max and base 1.
#pragma once

#include <math.h>

#include "core/hd.h"
#include "core/types.h"

namespace gradclip {

struct Partial {
  double sum;
  double base;
};

GRADCLIP_HD bool is_nan(double x) { return x != x; }

// Max that propagates NaN (std::max does not).
GRADCLIP_HD double nan_max(double a, double b) { return (is_nan(a) || a >= b) ? a : b; }

// sum * ratio^p for 0 < ratio < 1: a partial brought to a larger base. Terms
// that underflow here are below 2^-1022 of a partial of at least 2^-900
// (smaller plain partials are rescued), far below its last bit.
GRADCLIP_HD double rescale_sum(double sum, double ratio, NormOrder::Kind kind, double p) {
  switch (kind) {
    case NormOrder::kL1: return sum * ratio;
    case NormOrder::kL2: return sum * ratio * ratio;  // exact: L2 bases are powers of two
    default: return sum * pow(ratio, p);
  }
}

// Folds b into a (a += b) for a p-norm power sum; for the inf norm, the max.
GRADCLIP_HD Partial combine(Partial a, Partial b, NormOrder::Kind kind, double p) {
  if (kind == NormOrder::kInf) return {nan_max(a.sum, b.sum), 1.0};
  if (b.sum == 0.0) return a;
  if (a.sum == 0.0) return b;
  if (a.base == b.base) return {a.sum + b.sum, a.base};
  if (a.base > b.base) return {a.sum + rescale_sum(b.sum, b.base / a.base, kind, p), a.base};
  return {rescale_sum(a.sum, a.base / b.base, kind, p) + b.sum, b.base};
}

// The norm a partial stands for: (sum * base^p)^(1/p) = sum^(1/p) * base.
GRADCLIP_HD double partial_norm(Partial a, NormOrder::Kind kind, double p) {
  switch (kind) {
    case NormOrder::kL1: return a.sum * a.base;
    case NormOrder::kL2: return sqrt(a.sum) * a.base;
    case NormOrder::kInf: return a.sum;
    default: return pow(a.sum, 1.0 / p) * a.base;
  }
}

// A norm as a partial: {1, norm} stands for 1^(1/p) * norm. Zero, NaN and inf
// keep base 1 (a zero partial is the identity of combine).
GRADCLIP_HD Partial partial_of_norm(double norm, NormOrder::Kind kind) {
  // Zero, NaN, inf and inf-norm values stay as they are: folding keeps them.
  if (kind == NormOrder::kInf || norm == 0.0 || !(norm <= 1.7976931348623157e308)) return {norm, 1.0};
  return {1.0, norm};
}

}  // namespace gradclip
