// Power sums computed while a list of tensors is still being read (the CPU
// backend's pipelining of the intake). No Python or framework types.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "core/span_sink.h"
#include "core/types.h"

namespace gradclip::cpu {

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
class NormStream final : public SpanSink {
 public:
  static constexpr int64_t kMaxElems = int64_t(1) << 16;

  explicit NormStream(NormOrder order);
  ~NormStream();  // stop()
  NormStream(const NormStream&) = delete;
  NormStream& operator=(const NormStream&) = delete;

  // SpanSink: the spans to come, filled in order by the reader. The array must
  // not move, and the memory the spans describe must stay readable, until
  // close() or stop() returns.
  void attach(const Span* entries, size_t capacity) override;
  // Whether the stream reduces a span of this many elements.
  static bool takes(int64_t numel) { return numel > 0 && numel <= kMaxElems; }
  void added(size_t count) override {
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
  void stop() override;

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

}  // namespace gradclip::cpu
