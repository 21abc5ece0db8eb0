// CPU operations over a list of dense spans: chunking, threading, the
// overflow-safe norm, and in-place updates. No Python or framework types.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/types.h"

namespace gradclip::cpu {

struct Norms {
  std::vector<double> per_span;   // the p-norm of each span
  double total;                   // the p-norm of all spans together
  std::vector<double> per_group;  // the p-norm of each group's spans (when grouped)
  std::vector<double> power_sum;  // per span, the unrooted sum: lets renorm_spans redo a few spans
};

// Spans assigned to groups, e.g. an optimizer's param groups: group_of_span[s]
// is in [0, n_groups). Empty (the default): no per-group norms.
struct Grouping {
  std::vector<int32_t> group_of_span;
  int32_t n_groups = 0;
};

// Power sums of some spans computed beforehand (by a NormStream): known[s]
// says whether value[s] is span s's power sum.
struct KnownPowerSums {
  std::vector<char> known;
  std::vector<double> value;
};

// Results do not depend on the thread count or the ISA (see isa_kernels.h).
// Finite inputs never give an inf norm unless the true norm exceeds float64.
// A group's norm is computed exactly as the total is, over that group's spans.
// Power sums in `known` are taken as they are; only the other spans are read.
Norms compute_norms(const std::vector<Span>& spans, NormOrder order, const Grouping& groups = {},
                    const KnownPowerSums* known = nullptr);

// Power sums computed while a list is still being read: the reading thread
// add()s spans one by one and the pool's workers reduce them meanwhile (read
// only). Each power sum is computed exactly as compute_norms computes it, so
// the results do not depend on which thread took which span, or on whether
// any worker helped. Small spans only (<= kMaxElems): a large one would be
// reduced by one thread, where compute_norms splits it across all of them.
// The workers start once the added spans hold enough elements to be worth
// waking them; until then (or when they never start) close() does the work
// on the calling thread.
class NormStream {
 public:
  static constexpr int64_t kMaxElems = int64_t(1) << 16;

  explicit NormStream(NormOrder order);
  ~NormStream();  // stop()
  NormStream(const NormStream&) = delete;
  NormStream& operator=(const NormStream&) = delete;

  // Room for this many add()s; called once, before the first.
  void reserve(size_t n);
  // Whether add() takes a span of this size.
  static bool takes(int64_t numel) { return numel > 0 && numel <= kMaxElems; }
  // Queues `span` (takes(span.numel) must hold) as item number `tag`. One
  // thread adds; the memory must stay readable until close() or stop() returns.
  void add(int32_t tag, const Span& span);
  // No more spans: reduces whatever is left, with the workers, and waits for
  // them. Afterwards item k (in add order) is tags()[k] with power_sums()[k].
  void close();
  // Abandons the work (an input was refused): waits for the workers, results
  // unusable. Also what the destructor does; harmless after close().
  void stop();

  size_t size() const { return size_; }
  const std::vector<int32_t>& tags() const { return tags_; }
  const std::vector<double>& power_sums() const { return power_; }

 private:
  void work();
  void publish();
  void finish_workers();

  const NormOrder order_;
  std::vector<Span> spans_;
  std::vector<int32_t> tags_;
  std::vector<double> power_;
  size_t size_ = 0;
  size_t published_size_ = 0;
  int64_t unpublished_elems_ = 0;
  int64_t queued_elems_ = 0;  // before the workers start
  bool started_ = false;          // the workers were asked to start
  bool workers_running_ = false;  // the pool runs work() on them: finish() is due
  std::function<void(int64_t)> task_;
  alignas(64) std::atomic<int64_t> published_{0};  // spans_[0 .. published_) may be taken
  std::atomic<bool> closed_{false};
  std::atomic<bool> abort_{false};
  alignas(64) std::atomic<int64_t> next_{0};  // the first span nobody took yet
};

// The norm of a vector made of several parts, from the parts' own norms.
double combine_norms(const std::vector<double>& norms, NormOrder order);

// Recomputes the norms of the selected spans only (after they were modified)
// and, from them and the others' saved power sums, every total.
void renorm_spans(const std::vector<Span>& spans, NormOrder order, const std::vector<char>& selected,
                  const Grouping& groups, Norms& norms);

// Sets every NaN and inf element of the selected spans to +0; returns how many.
int64_t zero_nonfinite(const std::vector<Span>& spans, const std::vector<char>& selected);

// spans[i] *= coefs[i]; spans whose coefficient is exactly 1 are not touched.
void scale(const std::vector<Span>& spans, const std::vector<double>& coefs);

// Clamps every element of span i to [-limits[i], limits[i]], the bound first
// rounded to the span's dtype. Returns true when some element changed. Symmetric
// on purpose: it then commutes with negation, which negative-bit views rely on
// (intake.cpp).
bool clamp_symmetric(const std::vector<Span>& spans, const std::vector<double>& limits);

}  // namespace gradclip::cpu
