#include "cpu/clip.h"

#include <cmath>

#include "core/clip_math.h"

namespace gradclip::cpu {

ClipOutcome clip(const std::vector<Span>& spans, const ClipRequest& req) {
  ClipOutcome out;
  const bool grouped = req.groups.n_groups > 0;
  auto group_of = [&](size_t s) { return grouped ? req.groups.group_of_span[s] : 0; };

  out.norms = compute_norms(spans, req.order, req.groups, req.known);
  out.nonfinite_spans.resize(spans.size());
  for (size_t s = 0; s < spans.size(); ++s) {
    out.nonfinite_spans[s] = !std::isfinite(out.norms.per_span[s]);
    out.nonfinite |= out.nonfinite_spans[s] != 0;
  }
  // Finite spans whose total overflows also count: torch's test is on the total.
  out.nonfinite |= !finite_as_reported(out.norms.total, req.float32_total);
  if (out.nonfinite && req.nonfinite == NonfinitePolicy::kZero) {
    out.zeroed = zero_nonfinite(spans, out.nonfinite_spans);
    renorm_spans(spans, req.order, out.nonfinite_spans, req.groups, out.norms);
  }
  const bool hold = out.nonfinite && req.nonfinite == NonfinitePolicy::kHold;

  out.span_coefs.assign(spans.size(), 1.0);
  if (req.mode == ClipMode::kValue) {
    if (hold) return out;
    std::vector<double> limits(spans.size());
    for (size_t s = 0; s < spans.size(); ++s) limits[s] = req.limits[group_of(s)];
    out.written = clamp_symmetric(spans, limits);
    return out;
  }
  if (req.mode == ClipMode::kPerTensor) {
    for (size_t s = 0; s < spans.size(); ++s)
      out.span_coefs[s] = clip_coefficient(req.limits[group_of(s)], out.norms.per_span[s], req.eps);
  } else {
    const size_t n_groups = grouped ? req.groups.n_groups : 1;
    out.group_coefs.resize(n_groups);
    for (size_t g = 0; g < n_groups; ++g) {
      const double norm = grouped ? out.norms.per_group[g] : out.norms.total;
      out.group_coefs[g] = req.mode == ClipMode::kGlobal ? clip_coefficient(req.limits[g], norm, req.eps)
                                                         : normalize_coefficient(req.limits[g], norm);
    }
    for (size_t s = 0; s < spans.size(); ++s) out.span_coefs[s] = out.group_coefs[group_of(s)];
  }
  if (hold) return out;
  for (size_t s = 0; s < spans.size(); ++s) out.written |= out.span_coefs[s] != 1.0 && spans[s].numel > 0;
  scale(spans, out.span_coefs);
  return out;
}

}  // namespace gradclip::cpu
