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
#pragma once

#include <math.h>

#include "core/hd.h"

namespace gradclip {

// Plain power sums below this may have lost precision to float64 underflow.
constexpr double kTinyPowerSum = 0x1p-900;

// max_abs: the largest |x|, finite and non-zero.
GRADCLIP_HD double rescue_base(double max_abs, bool generic_p) {
  return generic_p ? max_abs : ldexp(1.0, ilogb(max_abs));
}

}  // namespace gradclip
