// Receives the spans of a list one by one while the list is still being read,
// so that work on the first can start before the last is read (the CPU
// backend's NormStream, cpu/norm_stream.h). No Python or framework types.
#pragma once

#include <cstddef>

#include "core/types.h"

namespace gradclip {

class SpanSink {
 public:
  // The spans to come: entries[0 .. capacity), filled in order by the reader.
  // The array does not move, and the memory the spans describe stays
  // readable, until the sink is closed by its owner or stop() returns.
  virtual void attach(const Span* entries, size_t capacity) = 0;
  // entries[count - 1] has just been filled (count grows by one per call).
  virtual void added(size_t count) = 0;
  // Abandons the work (an input was refused, or the spans are going away).
  virtual void stop() = 0;

 protected:
  ~SpanSink() = default;
};

}  // namespace gradclip
