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

// Whether a norm is finite as the caller will see it. A total reported as
// float32 (the result dtype of float32 and 16-bit inputs) is inf from float32's
// max plus half an ulp on, although the float64 sum behind it is finite; the
// decision to hold the gradients must agree with the error raised on it.
constexpr double kFloat32RoundsToInf = 0x1.ffffffp127;  // 2^128 - 2^103
GRADCLIP_HD bool finite_as_reported(double norm, bool as_float32) {
  const double magnitude = norm < 0 ? -norm : norm;  // NaN fails both comparisons
  return as_float32 ? magnitude < kFloat32RoundsToInf : magnitude <= 1.7976931348623157e308;
}

}  // namespace gradclip
