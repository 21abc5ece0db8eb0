#include "cpu/norm_stream.h"

#include <algorithm>
#include <thread>

#include "core/thread_pool.h"
#include "cpu/dispatch.h"
#include "cpu/isa_kernels.h"
#include "cpu/ops.h"

namespace gradclip::cpu {

namespace {
// A worker takes up to this many entries at once, holding up to this many elements.
constexpr int64_t kStreamBatchItems = 64;
constexpr int64_t kStreamBatchElems = int64_t(1) << 14;
// Workers start before kParallelMinElems are published once this many are,
// with at least this many entries of the list still to read: the wake-up
// (tens of microseconds on a VM) then hides behind reading them.
constexpr int64_t kEarlyStartElems = int64_t(1) << 15;
constexpr size_t kEarlyStartItemsLeft = 256;
// Before reducing a span a worker prefetches its first kPrefetchBytes
// (isa_kernels.h) of the next one: small tensors lie scattered, a page or less
// each, where the hardware prefetcher does not reach, and the kernels prefetch
// only from there on (2 KiB: bench/README.md, "Design measurements").

inline void prefetch_span(const Span& s) {
  const char* p = static_cast<const char*>(s.data);
  const int64_t n = std::min<int64_t>(kPrefetchBytes, s.numel * element_size(s.dtype));
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + o, 0, 3);
}
}  // namespace

NormStream::NormStream(NormOrder order) : order_(order) {}

NormStream::~NormStream() { stop(); }

void NormStream::attach(const Span* entries, size_t capacity) {
  entries_ = entries;
  capacity_ = capacity;
}

void NormStream::publish(size_t count) {
  unpublished_elems_ = 0;
  if (!started_) {
    for (size_t e = published_count_; e < count; ++e)
      if (takes(entries_[e].numel)) queued_elems_ += entries_[e].numel;
    published_count_ = count;
    maybe_start(count);
    return;
  }
  published_count_ = count;
  published_.store(static_cast<int64_t>(count), std::memory_order_release);
}

void NormStream::maybe_start(size_t count) {
  // Below kParallelMinElems waking the pool costs more than it saves, unless
  // enough of the list is left to read.
  if (queued_elems_ < kParallelMinElems &&
      !(queued_elems_ >= kEarlyStartElems && capacity_ - count >= kEarlyStartItemsLeft))
    return;
  started_ = true;
  power_.reset(new double[capacity_]);
  published_.store(static_cast<int64_t>(count), std::memory_order_release);
  task_ = [this](int64_t) { work(); };
  // When the pool declines (one thread, or busy with another caller), close() does it all.
  workers_running_ = ThreadPool::instance().start(ThreadPool::instance().num_threads(), task_);
}

void NormStream::work() {
  const IsaKernels& isa = active_isa();
  const Span* entries = entries_;
  double* power = power_.get();
  unsigned spins = 0;
  for (;;) {
    if (abort_.load(std::memory_order_relaxed)) return;
    const bool closed = closed_.load(std::memory_order_acquire);  // before published_: then it is final
    const int64_t avail = published_.load(std::memory_order_acquire);
    int64_t i = next_.load(std::memory_order_relaxed);
    if (i >= avail) {
      if (closed) return;
      // Ahead of the reader: wait for it, giving the core away now and then in
      // case the reader shares it (more threads than cores).
      if (++spins % 64 == 0) std::this_thread::yield();
      cpu_relax();
      continue;
    }
    int64_t end = i, elems = 0;
    while (end < avail && end - i < kStreamBatchItems && elems < kStreamBatchElems) elems += entries[end++].numel;
    if (!next_.compare_exchange_weak(i, end, std::memory_order_relaxed)) continue;
    for (int64_t k = i; k < end; ++k) {
      const Span& s = entries[k];
      if (!takes(s.numel)) continue;
      if (k + 1 < end && takes(entries[k + 1].numel)) prefetch_span(entries[k + 1]);
      power[k] = span_power_sum(isa, s, order_);
    }
  }
}

void NormStream::finish_workers() {
  if (workers_running_) {
    workers_running_ = false;
    ThreadPool::instance().finish();
  }
}

bool NormStream::close(size_t count) {
  if (!started_) return false;
  published_.store(static_cast<int64_t>(count), std::memory_order_release);
  closed_.store(true, std::memory_order_release);
  work();  // the caller takes part; when it returns every entry is taken
  finish_workers();
  return true;
}

void NormStream::stop() {
  abort_.store(true, std::memory_order_relaxed);
  closed_.store(true, std::memory_order_release);
  finish_workers();
}

}  // namespace gradclip::cpu
