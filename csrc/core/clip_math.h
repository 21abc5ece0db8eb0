// Scalar rules shared by every backend: how a norm becomes a clip coefficient.
// Compiled for the host and, inside the CUDA kernels, for the device.
#pragma once

#include "core/hd.h"

namespace gradclip {

// torch's rule, coef = min(max_norm / (norm + eps), 1), except that a NaN norm
// gives a NaN coefficient (std::min would hide it): like torch, NaN then spreads
// to every gradient and an inf norm zeroes them.
GRADCLIP_HD double clip_coefficient(double max_norm, double norm, double eps) {
  const double c = max_norm / (norm + eps);
  if (c != c) return c;
  return c < 1.0 ? c : 1.0;
}

// Scale that brings `norm` to `target`. A zero norm cannot be rescaled and is
// left alone (coefficient 1); nonfinite norms propagate as above.
GRADCLIP_HD double normalize_coefficient(double target, double norm) {
  if (norm == 0.0) return 1.0;
  return target / norm;
}

}  // namespace gradclip
