// Adaptive gradient clipping (Brock et al. 2021, NFNets), unit-wise: the
// gradient of each unit (a row: one index of the first dimension) is scaled so
// that its norm is at most clipping * max(||parameter row||, eps). One pass
// reads every parameter and gradient row; only clipped gradient rows are written.
// No Python or framework types.
#pragma once

#include <cstdint>
#include <vector>

#include "core/types.h"
#include "core/clip_rules.h"

namespace gradclip::cpu {

// A tensor as a stack of equal rows: `span` holds `rows` contiguous blocks.
struct RowSpan {
  Span span;
  int64_t rows;
};

struct UnitClipRequest {
  NormOrder order = NormOrder::from_p(2.0);
  std::vector<double> clipping;  // per tensor, lambda: the largest allowed ||grad row|| / max(||param row||, eps)
  double eps = 1e-3;             // floor on parameter-row norms, so zero-initialised rows can still move
  Nonfinite nonfinite = Nonfinite::kPropagate;  // as for any clip (core/clip_rules.h), on gradient rows
};

struct UnitClipOutcome {
  std::vector<double> param_norms;  // per tensor, the norm of the whole parameter
  std::vector<double> grad_norms;   // per tensor, the norm of the whole gradient before clipping (after zeroing)
  double grad_total = 0.0;          // the norm of all gradients together, likewise
  std::vector<char> nonfinite_grads;  // per tensor: a gradient row norm was NaN or inf before any repair
  int64_t units = 0;                  // rows seen
  int64_t clipped_units = 0;          // rows scaled down (or that would be, when held)
  bool nonfinite = false;             // some tensor in nonfinite_grads
  int64_t zeroed = 0;                 // elements set to 0 by Nonfinite::kZero
};

// params[i] and grads[i] are the same tensor's parameter and gradient, with the
// same number of rows and elements (the caller checks); grads are scaled in place.
UnitClipOutcome clip_units(const std::vector<RowSpan>& params, const std::vector<RowSpan>& grads,
                           const UnitClipRequest& request);

}  // namespace gradclip::cpu
