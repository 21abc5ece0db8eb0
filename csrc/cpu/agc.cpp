#include "cpu/agc.h"

#include <algorithm>
#include <cmath>

#include "core/clip_rules.h"
#include "cpu/ops.h"

namespace gradclip::cpu {

UnitClipOutcome clip_units(const std::vector<RowSpan>& params, const std::vector<RowSpan>& grads,
                           const UnitClipRequest& req) {
  // Rows are just spans: every row of every gradient, then every row of every
  // parameter, go through one compute_norms call (one chunk plan, one pass over
  // the memory). Grouping by tensor gives the per-tensor norms as a by-product:
  // group t holds the rows of grads[t], group n + t the rows of params[t].
  const int32_t n = static_cast<int32_t>(grads.size());
  std::vector<Span> rows;
  std::vector<int32_t> tensor_of_row;
  Grouping by_tensor;
  by_tensor.n_groups = 2 * n;
  int64_t grad_rows = 0;
  for (const RowSpan& g : grads) grad_rows += g.rows;
  rows.reserve(2 * grad_rows);
  by_tensor.group_of_span.reserve(2 * grad_rows);
  auto add_rows = [&](const RowSpan& t, int32_t group) {
    const int64_t len = t.rows > 0 ? t.span.numel / t.rows : 0;
    char* base = static_cast<char*>(t.span.data);
    for (int64_t r = 0; r < t.rows; ++r) {
      rows.push_back({len > 0 ? base + r * len * element_size(t.span.dtype) : nullptr, len, t.span.dtype});
      by_tensor.group_of_span.push_back(group);
    }
  };
  for (int32_t t = 0; t < n; ++t) add_rows(grads[t], t);
  for (int32_t t = 0; t < n; ++t) add_rows(params[t], n + t);
  Norms norms = compute_norms(rows, req.order, by_tensor);

  UnitClipOutcome out;
  out.units = grad_rows;
  out.nonfinite_grads.assign(n, 0);
  std::vector<char> bad_rows(rows.size(), 0);
  for (int64_t r = 0; r < grad_rows; ++r) {
    if (std::isfinite(norms.per_span[r])) continue;
    bad_rows[r] = 1;
    out.nonfinite_grads[by_tensor.group_of_span[r]] = 1;
    out.nonfinite = true;
  }
  if (out.nonfinite && req.nonfinite == Nonfinite::kZero) {
    out.zeroed = zero_nonfinite(rows, bad_rows);
    renorm_spans(rows, req.order, bad_rows, by_tensor, norms);
  }
  out.grad_norms.assign(norms.per_group.begin(), norms.per_group.begin() + n);
  out.param_norms.assign(norms.per_group.begin() + n, norms.per_group.end());
  out.grad_total = combine_norms(out.grad_norms, req.order);

  std::vector<double> coefs(grad_rows);
  for (int64_t r = 0; r < grad_rows; ++r) {
    const double clipping = req.clipping[by_tensor.group_of_span[r]];
    const double limit = clipping * std::max(norms.per_span[grad_rows + r], req.eps);
    const double grad_norm = norms.per_span[r];
    // eps 0: a row above the limit is scaled exactly to it. A zero row is left
    // alone (a zero limit would otherwise give 0 / 0).
    coefs[r] = grad_norm == 0.0 ? 1.0 : clip_coefficient(limit, grad_norm, 0.0);
    out.clipped_units += coefs[r] < 1.0;
  }
  if (holds(req.nonfinite, out.nonfinite)) return out;
  scale(std::vector<Span>(rows.begin(), rows.begin() + grad_rows), coefs);
  return out;
}

}  // namespace gradclip::cpu
