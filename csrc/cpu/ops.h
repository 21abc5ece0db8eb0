// CPU operations over a list of dense spans: chunking, threading, the
// overflow-safe norm, and in-place updates. No Python or framework types.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
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
// Finite inputs never give an inf norm unless the true norm exceeds float64,
// for any p (see core/norm_rescue.h).
// A group's norm is computed exactly as the total is, over that group's spans.
// Power sums in `known` are taken as they are; only the other spans are read.
Norms compute_norms(const std::vector<Span>& spans, NormOrder order, const Grouping& groups = {},
                    const KnownPowerSums* known = nullptr);

// Power sums computed while a list is still being read: the reading thread
// fills an array of spans in order and tells the stream how far it got; the
// pool's workers reduce the small spans read so far (read only). Each power
// sum is computed exactly as compute_norms computes it, so the results do not
// depend on which thread took which span, or on whether the workers ran.
// Small spans only (takes()): a large one would be reduced by one thread,
// where compute_norms splits it across all of them.
// The workers start once the spans read hold enough elements to be worth
// waking them. A stream that never started computes nothing (close() returns
// false): the caller then reduces everything as it would without a stream.
class NormStream {
 public:
  static constexpr int64_t kMaxElems = int64_t(1) << 16;

  explicit NormStream(NormOrder order);
  ~NormStream();  // stop()
  NormStream(const NormStream&) = delete;
  NormStream& operator=(const NormStream&) = delete;

  // The spans to come: entries[0 .. capacity), filled in order by the reader.
  // The array must not move, and the memory the spans describe must stay
  // readable, until close() or stop() returns.
  void attach(const Span* entries, size_t capacity);
  // Whether the stream reduces a span of this many elements.
  static bool takes(int64_t numel) { return numel > 0 && numel <= kMaxElems; }
  // entries[count - 1] has just been filled (count grows by one per call).
  void added(size_t count) {
    const int64_t numel = entries_[count - 1].numel;
    if (!takes(numel)) return;
    unpublished_elems_ += numel;
    if (unpublished_elems_ >= kPublishElems || count - published_count_ >= kPublishItems) publish(count);
  }
  // No more spans (`count` in all): reduces whatever is left, with the
  // workers, and waits for them. Returns whether the workers were started,
  // that is whether power_sum(e) is known for every entry e with
  // takes(entries[e].numel).
  bool close(size_t count);
  // Abandons the work (an input was refused): waits for the workers. Also
  // what the destructor does; harmless after close().
  void stop();

  double power_sum(size_t entry) const { return power_[entry]; }

  // The reader publishes filled entries once the new small ones hold this
  // many elements, or once this many entries are new: every store to
  // published_ takes its cache line away from the workers polling it.
  static constexpr int64_t kPublishElems = int64_t(1) << 13;
  static constexpr size_t kPublishItems = 16;

 private:
  void publish(size_t count);
  void maybe_start(size_t count);
  void work();
  void finish_workers();

  // Set before the workers start, then only read (also by them).
  const NormOrder order_;
  const Span* entries_ = nullptr;
  size_t capacity_ = 0;
  std::unique_ptr<double[]> power_;  // per entry; allocated when the workers start
  std::function<void(int64_t)> task_;
  // The reader's own bookkeeping, written for every entry: on a cache line of
  // its own, away from what the workers read.
  alignas(64) size_t published_count_ = 0;
  int64_t unpublished_elems_ = 0;
  int64_t queued_elems_ = 0;      // small-span elements published before the workers start
  bool started_ = false;          // the stream computes (workers asked to start, or not available)
  bool workers_running_ = false;  // the pool runs work() on them: finish() is due
  alignas(64) std::atomic<int64_t> published_{0};  // entries_[0 .. published_) may be taken
  std::atomic<bool> closed_{false};
  std::atomic<bool> abort_{false};
  alignas(64) std::atomic<int64_t> next_{0};  // the first entry nobody took yet
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
