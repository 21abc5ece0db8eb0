// Whether a strided tensor covers a dense, non-overlapping block of memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace gradclip {

struct Layout {
  int64_t numel = 1;
  bool dense = true;          // every element distinct and the block gap-free, in some stride order
  int64_t lowest_offset = 0;  // element offset of the lowest address (negative strides)
};

// strides in elements; nullptr means compact row-major.
inline Layout analyse_layout(int ndim, const int64_t* shape, const int64_t* strides) {
  Layout out;
  struct Dim { int64_t size, stride; };
  Dim dims[64];
  int n = 0;
  for (int i = 0; i < ndim; ++i) {
    out.numel *= shape[i];
    if (strides == nullptr || shape[i] == 1) continue;
    if (strides[i] < 0) out.lowest_offset += (shape[i] - 1) * strides[i];
    if (n < 64) dims[n++] = {shape[i], std::llabs(strides[i])};
  }
  if (strides == nullptr || out.numel == 0) {
    out.lowest_offset = 0;
    return out;
  }
  if (ndim > 64) {
    out.dense = false;
    return out;
  }
  // Dense iff, in increasing stride order, each stride equals the product of
  // the sizes before it (a permutation of a compact layout).
  std::sort(dims, dims + n, [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t expected = 1;
  for (int i = 0; i < n; ++i) {
    if (dims[i].stride != expected) {
      out.dense = false;
      break;
    }
    expected *= dims[i].size;
  }
  return out;
}

}  // namespace gradclip
