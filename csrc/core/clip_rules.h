// The clip rules, written once for every backend: which clip a request asks
// for, what a nonfinite norm does, and how a norm becomes a coefficient.
// Compiled for the host (cpu/clip.cpp, the engine) and, inside the CUDA
// finalize kernel, for the device.
#pragma once

#include <stdint.h>

#include "core/hd.h"

namespace gradclip {

// What a clip does with the norms it computes. The Python layer names them
// "none", "global", "per_tensor", "normalize" and "value".
enum class ClipKind : int32_t {
  kNone,       // norms only: nothing is written
  kGlobal,     // each group scaled by min(limit / (group norm + eps), 1) (torch's clip_grad_norm_)
  kPerTensor,  // each tensor scaled by min(limit / (its norm + eps), 1) (Keras clipnorm)
  kNormalize,  // each group scaled so that its norm becomes `limit`
  kValue,      // each element clamped to [-limit, limit] (Keras clipvalue)
};

// What a NaN or inf norm does. The Python layer's policies map onto these:
// 'propagate' -> kPropagate, 'error' and 'skip' -> kHold (the Python layer then
// raises or skips the step), 'zero' -> kZero; torch's error_if_nonfinite=True is kHold.
enum class Nonfinite : int32_t {
  kPropagate,  // clip anyway, as torch does (NaN spreads, an inf norm zeroes)
  kHold,       // write nothing
  kZero,       // set the NaN / inf elements to 0, renorm those tensors, then clip (CPU only)
};

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

// The factor a tensor or group of this kind is scaled by, given its norm and
// its limit. kNone and kValue scale nothing.
GRADCLIP_HD double coefficient(ClipKind kind, double limit, double norm, double eps) {
  switch (kind) {
    case ClipKind::kGlobal:
    case ClipKind::kPerTensor: return clip_coefficient(limit, norm, eps);
    case ClipKind::kNormalize: return normalize_coefficient(limit, norm);
    default: return 1.0;
  }
}

// Whether the coefficient belongs to a group (kGlobal, kNormalize) or to each tensor.
GRADCLIP_HD bool per_group_coefficient(ClipKind kind) {
  return kind == ClipKind::kGlobal || kind == ClipKind::kNormalize;
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

// Whether a call saw a nonfinite norm: some tensor's, or the total as reported
// (finite tensors whose total overflows count too: torch's test is on the total).
GRADCLIP_HD bool saw_nonfinite(bool some_tensor_nonfinite, double total, bool total_as_float32) {
  return some_tensor_nonfinite || !finite_as_reported(total, total_as_float32);
}

// Whether nothing may be written.
GRADCLIP_HD bool holds(Nonfinite policy, bool nonfinite) { return nonfinite && policy == Nonfinite::kHold; }

}  // namespace gradclip
