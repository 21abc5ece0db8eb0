// The engine's CPU backend: the fused SIMD kernels of cpu/ over host memory,
// with the list's small tensors reduced while the list is still being read
// (its NormStream is the intake's span sink).
#pragma once

#include <vector>

#include "cpu/norm_stream.h"
#include "cpu/ops.h"
#include "engine/engine.h"

namespace gradclip::engine {

class CpuBackend final : public Backend {
 public:
  // Made before the intake, for a request of this norm order, so that the
  // intake can feed sink().
  explicit CpuBackend(NormOrder order) : stream_(order) {}
  SpanSink* sink() { return &stream_; }
  // Once the intake is read: its unique spans, how many entries the sink saw,
  // and each span's first entry (null when there are no repeats: span s is
  // entry s).
  void set_spans(const std::vector<Span>& spans, size_t entries, const std::vector<int32_t>* first_entry_of_span);

  void reduce(const Request& req) override;
  GroupPartials group_partials(const Request& req) override;
  Summary summary(const Request&) override { return {norms_.total, nonfinite_}; }
  Outcome finish(const Request& req, const Span* combined) override;

 private:
  const std::vector<Span>* spans_ = nullptr;
  size_t entries_ = 0;
  const std::vector<int32_t>* first_entry_ = nullptr;
  cpu::NormStream stream_;
  bool reduced_ = false;
  cpu::Norms norms_;
  std::vector<char> nonfinite_spans_;  // before any repair
  bool nonfinite_ = false;             // some span, or the local total as reported
  int64_t zeroed_ = 0;
};

}  // namespace gradclip::engine
