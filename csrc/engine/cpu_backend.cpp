#include "engine/cpu_backend.h"

#include <cmath>
#include <memory>

namespace gradclip::engine {
namespace {

// Whether the request reads per-span nonfinite flags (a report, or a policy
// that acts on them); torch's plain clip needs only the total's.
bool needs_span_flags(const Request& req) { return req.want_report || req.nonfinite != Nonfinite::kPropagate; }

}  // namespace

void CpuBackend::set_spans(const std::vector<Span>& spans, size_t entries,
                           const std::vector<int32_t>* first_entry_of_span) {
  spans_ = &spans;
  entries_ = entries;
  first_entry_ = first_entry_of_span;
}

void CpuBackend::reduce(const Request& req) {
  const std::vector<Span>& spans = *spans_;
  const size_t n = spans.size();
  // The power sums the stream computed while the list was read, per unique span.
  std::unique_ptr<cpu::KnownPowerSums> known;
  if (stream_.close(entries_)) {
    known = std::make_unique<cpu::KnownPowerSums>();
    known->known.resize(n);
    known->value.resize(n);
    for (size_t s = 0; s < n; ++s) {
      const bool taken = cpu::NormStream::takes(spans[s].numel);  // the entry's span, as the stream saw it
      known->known[s] = taken;
      known->value[s] = taken ? stream_.power_sum(first_entry_ ? (*first_entry_)[s] : int32_t(s)) : 0.0;
    }
  }
  norms_ = cpu::compute_norms(spans, req.order, req.groups, known.get());
  reduced_ = true;
  bool span_nonfinite = false;
  if (needs_span_flags(req)) {
    nonfinite_spans_.resize(n);
    for (size_t s = 0; s < n; ++s) span_nonfinite |= (nonfinite_spans_[s] = !std::isfinite(norms_.per_span[s])) != 0;
  }
  nonfinite_ = saw_nonfinite(span_nonfinite, norms_.total, req.total_as_float32);
  if (nonfinite_ && req.nonfinite == Nonfinite::kZero) {
    zeroed_ = cpu::zero_nonfinite(spans, nonfinite_spans_);
    cpu::renorm_spans(spans, req.order, nonfinite_spans_, req.groups, norms_);
  }
}

GroupPartials CpuBackend::group_partials(const Request& req) {
  // Each group's norm as a partial ({1, norm}: core/partial.h): exact for the
  // norm, and safe to fold with other partials whatever their size.
  GroupPartials out;
  const int32_t n_groups = req.n_groups();
  out.host.resize(n_groups);
  for (int32_t g = 0; g < n_groups; ++g)
    out.host[g] = partial_of_norm(req.groups.n_groups > 0 ? norms_.per_group[g] : norms_.total, req.order.kind);
  return out;
}

Outcome CpuBackend::finish(const Request& req, const Span* combined) {
  const std::vector<Span>& spans = *spans_;
  const size_t n = spans.size();
  Outcome out;
  if (!reduced_) {
    if (req.kind == ClipKind::kValue) {
      std::vector<double> limits(n);
      for (size_t s = 0; s < n; ++s) limits[s] = req.limits[req.group_of(s)];
      out.changed = out.written = cpu::clamp_symmetric(spans, limits);
      return out;
    }
    // A given norm (kGlobal): its coefficient, by the clip rule, for every span.
    const GivenNorm& given = req.given;
    const double norm = given.in_memory ? load_as_double(given.in_memory->data, 0, given.in_memory->dtype) : given.value;
    const double coef = coefficient(req.kind, req.limits[0], norm, req.eps);
    cpu::scale(spans, std::vector<double>(n, coef));
    out.total = norm;
    for (size_t s = 0; s < n && !out.written; ++s) out.written = coef != 1.0 && spans[s].numel > 0;
    return out;
  }

  const bool grouped = req.groups.n_groups > 0;
  out.total = norms_.total;
  out.per_span = std::move(norms_.per_span);
  out.per_group = std::move(norms_.per_group);
  out.nonfinite = nonfinite_;
  out.nonfinite_spans = std::move(nonfinite_spans_);
  out.zeroed = zeroed_;
  if (combined) {
    // The seam: each group's partial replaced by the combined one (other
    // devices' or processes' folded in); the total folds them in group order.
    const Partial* parts = static_cast<const Partial*>(combined->data);
    const int32_t n_groups = req.n_groups();
    const int64_t stacked = combined->numel / (2 * int64_t(n_groups));
    Partial all{0.0, 1.0};
    for (int32_t g = 0; g < n_groups; ++g) {
      Partial group{0.0, 1.0};
      for (int64_t k = 0; k < stacked; ++k) group = combine(group, parts[k * n_groups + g], req.order.kind, req.order.p);
      all = combine(all, group, req.order.kind, req.order.p);
      if (grouped) out.per_group[g] = partial_norm(group, req.order.kind, req.order.p);
    }
    out.total = partial_norm(all, req.order.kind, req.order.p);
    bool span_nonfinite = false;
    for (char bad : out.nonfinite_spans) span_nonfinite |= bad != 0;
    out.nonfinite = saw_nonfinite(span_nonfinite, out.total, req.total_as_float32);
  }
  out.held = holds(req.nonfinite, out.nonfinite);
  if (req.kind == ClipKind::kNone) return out;

  if (req.kind == ClipKind::kValue) {
    if (out.held) return out;
    std::vector<double> limits(n);
    for (size_t s = 0; s < n; ++s) limits[s] = req.limits[req.group_of(s)];
    out.changed = out.written = cpu::clamp_symmetric(spans, limits);
    return out;
  }
  out.span_coefs.assign(n, 1.0);
  if (per_group_coefficient(req.kind)) {
    out.group_coefs.resize(req.n_groups());
    for (int32_t g = 0; g < req.n_groups(); ++g)
      out.group_coefs[g] = coefficient(req.kind, req.limits[g], grouped ? out.per_group[g] : out.total, req.eps);
    for (size_t s = 0; s < n; ++s) out.span_coefs[s] = out.group_coefs[req.group_of(s)];
  } else {
    for (size_t s = 0; s < n; ++s)
      out.span_coefs[s] = coefficient(req.kind, req.limits[req.group_of(s)], out.per_span[s], req.eps);
  }
  if (out.held) return out;
  for (size_t s = 0; s < n; ++s) out.written |= out.span_coefs[s] != 1.0 && spans[s].numel > 0;
  cpu::scale(spans, out.span_coefs);
  return out;
}

}  // namespace gradclip::engine
