// Clipping a list of spans, possibly split into groups with their own limits:
// one norm pass, the coefficients, then one in-place pass (none when nothing
// needs clipping). No Python or framework types.
#pragma once

#include <cstdint>
#include <vector>

#include "core/types.h"
#include "cpu/ops.h"

namespace gradclip::cpu {

enum class ClipMode {
  kGlobal,     // each group scaled by min(limit / (group norm + eps), 1)
  kPerTensor,  // each span scaled by min(limit / (span norm + eps), 1) (Keras clipnorm)
  kNormalize,  // each group scaled so that its norm becomes `limit`
  kValue,      // each element clamped to [-limit, limit] (Keras clipvalue)
};

// What to do when some span's norm is NaN or inf.
enum class NonfinitePolicy {
  kPropagate,  // clip anyway, as torch does (NaN spreads, an inf norm zeroes)
  kHold,       // write nothing; the caller raises or skips the step
  kZero,       // set the NaN / inf elements to 0, renorm those spans, then clip
};

struct ClipRequest {
  ClipMode mode = ClipMode::kGlobal;
  NormOrder order = NormOrder::from_p(2.0);
  double eps = 0.0;
  std::vector<double> limits;  // one per group (a single group when `groups` is empty)
  Grouping groups;
  NonfinitePolicy nonfinite = NonfinitePolicy::kPropagate;
  bool float32_total = false;  // the total is reported as float32 (see finite_as_reported)
  const KnownPowerSums* known = nullptr;  // power sums computed beforehand (see compute_norms)
};

struct ClipOutcome {
  Norms norms;                      // per span, per group and total; after any zeroing
  std::vector<double> group_coefs;  // kGlobal / kNormalize: each group's factor, else empty
  std::vector<double> span_coefs;   // the factor each span was (or, when held, would be) scaled by
  std::vector<char> nonfinite_spans;  // spans whose norm was NaN or inf before any repair
  bool nonfinite = false;             // some span was
  bool written = false;               // some element was changed
  int64_t zeroed = 0;                 // elements set to 0 by kZero
};

ClipOutcome clip(const std::vector<Span>& spans, const ClipRequest& request);

}  // namespace gradclip::cpu
