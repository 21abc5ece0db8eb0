// The rescue of a power sum that overflowed or underflowed float64, one rule
// for both backends (cpu/ops.cpp, cuda/kernels.cu). The elements are summed
// again divided by a base, and the norm is root(sum) * base:
//   L1, L2: base = 2^e, e the exponent of the largest |x|. The division is
//     exact, the largest scaled element lies in [1, 2), so no L2 sum of fewer
//     than 2^1021 elements can overflow.
//   any other p: base = the largest |x| itself. Every scaled element is at
//     most 1 and the largest is exactly 1, so the sum lies in [1, n] for every
//     p, however large: |x|^p can neither overflow (elements of [1, 2) would
//     for p >= 1024) nor underflow to zero (those of [0.5, 1) would for p >
//     1074). Its rounding costs about p ulps in each power, which the root
//     divides by p again.
//
// When to rescue differs by what the sum is, so there are two triggers:
//   sum_needs_rescue     a whole tensor's sum (CPU): it is final, so only an
//                        actual overflow (inf) or a possible underflow counts.
//   partial_needs_rescue a block's partial (CUDA): it is still to be added to
//                        other blocks' partials, so a sum large enough that
//                        such additions could overflow counts too.
#pragma once

#include <math.h>

#include "core/hd.h"
#include "core/partial.h"

namespace gradclip {

// Plain power sums below this may have lost precision to float64 underflow.
constexpr double kTinyPowerSum = 0x1p-900;
// Plain partials above this are redone with a base: then every plain partial
// is at most 2^900, and adding up any number of them (< 2^123) cannot
// overflow where the true sum is finite.
constexpr double kHugePowerSum = 0x1p900;

// max_abs: the largest |x|, finite and non-zero.
GRADCLIP_HD double rescue_base(double max_abs, bool generic_p) {
  return generic_p ? max_abs : ldexp(1.0, ilogb(max_abs));
}

// may_underflow: whether |x|^p of some element of this dtype can fall below
// kTinyPowerSum (cpu/ops.cpp).
GRADCLIP_HD bool sum_needs_rescue(double power_sum, bool may_underflow) {
  return power_sum == HUGE_VAL || (power_sum < kTinyPowerSum && may_underflow);
}

GRADCLIP_HD bool partial_needs_rescue(double sum, double max_abs) {
  if (is_nan(sum) || is_nan(max_abs) || max_abs == 0.0) return false;
  if (max_abs > 1.7976931348623157e308) return false;  // an inf element: the norm is inf
  return sum > kHugePowerSum || sum < kTinyPowerSum;
}

}  // namespace gradclip
