#include "cpu/ops.h"

#include <atomic>
#include <algorithm>
#include <cmath>
#include <cstddef>

#include "core/norm_rescue.h"
#include "core/thread_pool.h"
#include "cpu/dispatch.h"

namespace gradclip::cpu {
namespace {

// Partial sums are kept per chunk of this many elements and combined in chunk
// order, so the result is the same whatever thread computed each chunk.
constexpr int64_t kChunkElems = int64_t(1) << 15;
// Small chunks (small tensors) are grouped into tasks of about this size.
constexpr int64_t kTaskElems = int64_t(1) << 16;

struct Chunk {
  int32_t span;
  int64_t begin;
  int64_t n;
};

// Splits the selected spans into fixed chunks and groups the chunks into tasks.
struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<size_t> task_start{0};  // chunks[task_start[t] .. task_start[t+1]) form task t
  int64_t elements = 0;

  ChunkPlan(const std::vector<Span>& spans, const std::vector<char>* selected = nullptr) {
    int64_t in_task = 0;
    for (size_t s = 0; s < spans.size(); ++s) {
      if (selected && !(*selected)[s]) continue;
      for (int64_t b = 0; b < spans[s].numel; b += kChunkElems) {
        const int64_t n = std::min(kChunkElems, spans[s].numel - b);
        chunks.push_back({static_cast<int32_t>(s), b, n});
        elements += n;
        in_task += n;
        if (in_task >= kTaskElems) {
          task_start.push_back(chunks.size());
          in_task = 0;
        }
      }
    }
    if (task_start.back() != chunks.size()) task_start.push_back(chunks.size());
  }

  // Calls fn(chunk_index, chunk) for every chunk, across threads when worth it.
  template <class Fn>
  void for_each(Fn&& fn) const {
    const int64_t n_tasks = static_cast<int64_t>(task_start.size()) - 1;
    auto run_task = [&](int64_t t) {
      for (size_t c = task_start[t]; c < task_start[t + 1]; ++c) fn(c, chunks[c]);
    };
    if (elements < kParallelMinElems || n_tasks < 2) {
      for (int64_t t = 0; t < n_tasks; ++t) run_task(t);
    } else {
      ThreadPool::instance().run(n_tasks, run_task);
    }
  }
};

inline const char* element_ptr(const Span& s, int64_t i) {
  return static_cast<const char*>(s.data) + i * element_size(s.dtype);
}

// The generic-p chunk kernel, shared by every ISA (pow has no SIMD form here).
// Same lane contract as the SIMD reductions.
double power_sum_generic(const void* x, int64_t n, DType t, double p) {
  double lanes[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i % kLanes] += std::pow(std::fabs(load_as_double(x, i, t)), p);
  return fold_sum(lanes);
}

double root(double power_sum, NormOrder order) {
  switch (order.kind) {
    case NormOrder::kL1: return power_sum;
    case NormOrder::kL2: return std::sqrt(power_sum);
    case NormOrder::kP: return std::pow(power_sum, 1.0 / order.p);
    case NormOrder::kInf: return power_sum;
  }
  return power_sum;
}

double element_power(double abs_x, NormOrder order) {
  switch (order.kind) {
    case NormOrder::kL1: return abs_x;
    case NormOrder::kL2: return abs_x * abs_x;
    default: return std::pow(abs_x, order.p);
  }
}

// Whether |x|^p of some representable element can fall below kTinyPowerSum.
bool may_underflow(DType t, NormOrder order) {
  if (t == DType::kF64) return true;
  // The smallest float32 subnormal is 2^-149 (16-bit types are larger): its
  // p-th power stays above 2^-900 for p <= 6.
  return order.kind == NormOrder::kP && order.p > 6.0;
}

// Rare path: the plain power sum overflowed or may have underflowed (below
// kTinyPowerSum). Sum again with every element divided by the rescue's base
// (core/norm_rescue.h).
double rescued_norm(const Span& s, NormOrder order) {
  const IsaKernels& isa = active_isa();
  double max_abs = 0.0;
  for (int64_t b = 0; b < s.numel; b += kChunkElems)
    max_abs = nan_max(max_abs,
                      isa.max_abs[int(s.dtype)](element_ptr(s, b), std::min(kChunkElems, s.numel - b), s.numel - b));
  if (max_abs == 0.0 || !std::isfinite(max_abs)) return max_abs;
  const double base = rescue_base(max_abs, order.kind == NormOrder::kP);
  double lanes[kLanes] = {};
  for (int64_t i = 0; i < s.numel; ++i)
    lanes[i % kLanes] += element_power(std::fabs(load_as_double(s.data, i, s.dtype)) / base, order);
  return root(fold_sum(lanes), order) * base;
}

// One chunk's partial power sum: sum |x|^p, or max |x| for the inf norm.
inline double chunk_power(const IsaKernels& isa, const Span& s, int64_t begin, int64_t n, NormOrder order) {
  const void* x = element_ptr(s, begin);
  const int d = int(s.dtype);
  const int64_t extent = s.numel - begin;
  switch (order.kind) {
    case NormOrder::kL2: return isa.sum_squares[d](x, n, extent);
    case NormOrder::kL1: return isa.sum_abs[d](x, n, extent);
    case NormOrder::kInf: return isa.max_abs[d](x, n, extent);
    case NormOrder::kP: return power_sum_generic(x, n, s.dtype, order.p);
  }
  return 0.0;
}

// Adds a chunk's partial into its span's power sum (chunks are added in order).
inline void accumulate(double& acc, double partial, NormOrder order) {
  acc = order.kind == NormOrder::kInf ? nan_max(acc, partial) : acc + partial;
}

// One span's power sum on the calling thread: exactly what power_sums() gives.
double span_power_sum_with(const IsaKernels& isa, const Span& s, NormOrder order) {
  double acc = 0.0;
  for (int64_t b = 0; b < s.numel; b += kChunkElems)
    accumulate(acc, chunk_power(isa, s, b, std::min(kChunkElems, s.numel - b), order), order);
  return acc;
}

// Per selected span (all when `selected` is null), its power sum: sum |x|^p, or
// max |x| for the inf norm. Unselected spans get 0.
std::vector<double> power_sums(const std::vector<Span>& spans, NormOrder order, const std::vector<char>* selected) {
  const IsaKernels& isa = active_isa();
  const ChunkPlan plan(spans, selected);
  std::vector<double> partial(plan.chunks.size());
  plan.for_each([&](size_t c, const Chunk& ch) {
    partial[c] = chunk_power(isa, spans[ch.span], ch.begin, ch.n, order);
  });
  // Combine partials per span, in chunk order (chunks are laid out span by span).
  std::vector<double> power_sum(spans.size(), 0.0);
  for (size_t c = 0; c < plan.chunks.size(); ++c) accumulate(power_sum[plan.chunks[c].span], partial[c], order);
  return power_sum;
}

// The norm of several spans together (`members`, in span order), from their
// power sums, or from their norms when a power sum had to be rescued.
double combined_norm(const std::vector<Span>& spans, NormOrder order, const Norms& n, const std::vector<char>& rescued,
                     const int32_t* members_begin, const int32_t* members_end) {
  struct Range {
    const int32_t *b, *e;
    const int32_t* begin() const { return b; }
    const int32_t* end() const { return e; }
  } members{members_begin, members_end};
  if (order.kind == NormOrder::kInf) {
    double m = 0.0;
    for (int32_t s : members) m = nan_max(m, n.per_span[s]);
    return m;
  }
  bool exact_sum_ok = true;  // may the result come from the plain sum of power sums?
  bool tiny_risk = false;
  double total_power = 0.0;
  for (int32_t s : members) {
    exact_sum_ok &= !rescued[s];
    tiny_risk |= may_underflow(spans[s].dtype, order);
    total_power += n.power_sum[s];
  }
  if (exact_sum_ok && !sum_needs_rescue(total_power, tiny_risk))
    return root(total_power, order);  // also the NaN case: NaN stays NaN
  std::vector<double> norms;
  norms.reserve(members_end - members_begin);
  for (int32_t s : members) norms.push_back(n.per_span[s]);
  return combine_norms(norms, order);
}

// Per-span norms (rescuing overflowed or underflowed power sums), then the
// total and the per-group norms.
void finish_norms(const std::vector<Span>& spans, NormOrder order, const Grouping& groups, Norms& n) {
  std::vector<char> rescued(spans.size(), 0);
  n.per_span.resize(spans.size());
  for (size_t s = 0; s < spans.size(); ++s) {
    const double ps = n.power_sum[s];
    if (order.kind != NormOrder::kInf && sum_needs_rescue(ps, may_underflow(spans[s].dtype, order))) {
      n.per_span[s] = rescued_norm(spans[s], order);
      rescued[s] = 1;
    } else {
      n.per_span[s] = root(ps, order);
    }
  }
  std::vector<int32_t> members(spans.size());
  for (size_t s = 0; s < spans.size(); ++s) members[s] = static_cast<int32_t>(s);
  n.total = combined_norm(spans, order, n, rescued, members.data(), members.data() + members.size());

  n.per_group.assign(groups.n_groups, 0.0);
  if (groups.n_groups == 0) return;
  // Counting sort by group (stable: span order within a group), so that group g's
  // spans are members[start[g] .. start[g + 1]).
  std::vector<size_t> start(groups.n_groups + 1, 0);
  for (size_t s = 0; s < spans.size(); ++s) ++start[groups.group_of_span[s] + 1];
  for (int32_t g = 0; g < groups.n_groups; ++g) start[g + 1] += start[g];
  std::vector<size_t> next(start.begin(), start.end() - 1);
  for (size_t s = 0; s < spans.size(); ++s) members[next[groups.group_of_span[s]]++] = static_cast<int32_t>(s);
  for (int32_t g = 0; g < groups.n_groups; ++g)
    n.per_group[g] = combined_norm(spans, order, n, rescued, members.data() + start[g], members.data() + start[g + 1]);
}

}  // namespace

double span_power_sum(const IsaKernels& isa, const Span& s, NormOrder order) {
  return span_power_sum_with(isa, s, order);
}

double combine_norms(const std::vector<double>& norms, NormOrder order) {
  // The norms are elements of a vector whose norm this is, summed with the
  // rescue's base (core/norm_rescue.h), so that neither overflow nor
  // underflow can occur. NaN propagates; an inf norm gives inf.
  double m = 0.0;
  for (double v : norms) m = nan_max(m, v);
  if (order.kind == NormOrder::kInf || m == 0.0 || !std::isfinite(m)) return m;
  const double base = rescue_base(m, order.kind == NormOrder::kP);
  double sum = 0.0;
  for (double v : norms) sum += element_power(v / base, order);
  return root(sum, order) * base;
}

Norms compute_norms(const std::vector<Span>& spans, NormOrder order, const Grouping& groups,
                    const KnownPowerSums* known) {
  Norms n;
  if (known) {
    std::vector<char> unknown(spans.size());
    bool any = false;
    for (size_t s = 0; s < spans.size(); ++s) any |= (unknown[s] = !known->known[s]) != 0;
    if (any) {
      n.power_sum = power_sums(spans, order, &unknown);
      for (size_t s = 0; s < spans.size(); ++s)
        if (known->known[s]) n.power_sum[s] = known->value[s];
    } else {
      n.power_sum = known->value;
    }
  } else {
    n.power_sum = power_sums(spans, order, nullptr);
  }
  finish_norms(spans, order, groups, n);
  return n;
}

void renorm_spans(const std::vector<Span>& spans, NormOrder order, const std::vector<char>& selected,
                  const Grouping& groups, Norms& norms) {
  const std::vector<double> redone = power_sums(spans, order, &selected);
  for (size_t s = 0; s < spans.size(); ++s)
    if (selected[s]) norms.power_sum[s] = redone[s];
  finish_norms(spans, order, groups, norms);
}

namespace {

// An element is NaN or inf exactly when its exponent bits are all ones.
template <class Bits, Bits kExponent>
int64_t zero_nonfinite_block(void* data, int64_t n) {
  Bits* x = static_cast<Bits*>(data);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if ((x[i] & kExponent) == kExponent) {
      x[i] = 0;
      ++count;
    }
  }
  return count;
}

}  // namespace

int64_t zero_nonfinite(const std::vector<Span>& spans, const std::vector<char>& selected) {
  const ChunkPlan plan(spans, &selected);
  std::vector<int64_t> counts(plan.chunks.size(), 0);
  plan.for_each([&](size_t c, const Chunk& ch) {
    const Span& s = spans[ch.span];
    void* x = const_cast<char*>(element_ptr(s, ch.begin));
    switch (s.dtype) {
      case DType::kF32: counts[c] = zero_nonfinite_block<uint32_t, 0x7f800000u>(x, ch.n); break;
      case DType::kF64: counts[c] = zero_nonfinite_block<uint64_t, 0x7ff0000000000000ull>(x, ch.n); break;
      case DType::kF16: counts[c] = zero_nonfinite_block<uint16_t, 0x7c00u>(x, ch.n); break;
      case DType::kBF16: counts[c] = zero_nonfinite_block<uint16_t, 0x7f80u>(x, ch.n); break;
    }
  });
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  return total;
}

void scale(const std::vector<Span>& spans, const std::vector<double>& coefs) {
  std::vector<char> selected(spans.size());
  bool any = false;
  for (size_t s = 0; s < spans.size(); ++s) any |= (selected[s] = coefs[s] != 1.0 && spans[s].numel > 0);
  if (!any) return;
  const IsaKernels& isa = active_isa();
  const ChunkPlan plan(spans, &selected);
  plan.for_each([&](size_t, const Chunk& ch) {
    const Span& s = spans[ch.span];
    isa.scale[int(s.dtype)](const_cast<char*>(element_ptr(s, ch.begin)), ch.n, s.numel - ch.begin, coefs[ch.span]);
  });
}

bool clamp_symmetric(const std::vector<Span>& spans, const std::vector<double>& limits) {
  std::vector<double> hi_of(spans.size());
  for (size_t s = 0; s < spans.size(); ++s) hi_of[s] = round_to_dtype(limits[s], spans[s].dtype);
  const IsaKernels& isa = active_isa();
  const ChunkPlan plan(spans);
  std::atomic<bool> changed{false};
  plan.for_each([&](size_t, const Chunk& ch) {
    const Span& s = spans[ch.span];
    const double hi = hi_of[ch.span];
    if (isa.clamp[int(s.dtype)](const_cast<char*>(element_ptr(s, ch.begin)), ch.n, s.numel - ch.begin, -hi, hi))
      changed.store(true, std::memory_order_relaxed);
  });
  return changed.load();
}

}  // namespace gradclip::cpu
