// How the CUDA kernels split a list of tensors into work, and how their
// partial sums fold, written once for the device and the host: nvcc compiles
// it into the kernels (and their host-side launch code), the host compiler
// into gradclip._cuda_sim, which runs the same kernels on the CPU and walks
// this plan alone (cuda_sim/plan_coverage.cpp) for the tests. Plain
// arithmetic only: no CUDA types.
//
// The flat space. The tensors of a call, in list order, are laid end to end:
// tensor t owns elements [start(t), start(t+1)). Block b of a launch owns the
// chunk [b * kChunk, (b + 1) * kChunk) of that space, cut at tensor ends into
// segments. Segment (t, b) gets the slot t + b in the partials array: a block's
// segments have consecutive slots, the next block's start one past its last,
// so every slot is unique and tensor t's segments are the consecutive slots
// t + first_block(t) .. t + last_block(t). That makes the final fold a fixed
// order that no launch geometry or scheduling can change: results are bitwise
// reproducible.
#pragma once

#include <math.h>

#include <cstdint>

#include "core/hd.h"
#include "core/partial.h"

namespace gradclip::cuda_plan {

constexpr int64_t kChunk = 8192;         // elements per block of the norm, scale and clamp kernels
constexpr int kThreads = 256;            // threads per such block
constexpr int kFinalizeThreads = 1024;   // the single block that folds the partials
constexpr int kVectorBytes = 16;         // one aligned 128-bit load or store
// A tensor with at most this many segments is folded by one thread; larger
// ones by a warp (32 lanes, strided, then a fixed shuffle tree).
constexpr int64_t kSerialFoldSegments = 8;
// Tensors per launch table: 16 bytes each must fit the 32 KB of kernel parameters.
constexpr int kMaxTensorsPerLaunch = 2000;

// ---- tags: start offset, dtype and group packed in 64 bits ----
// Kernel parameters are limited to 32 KB, so each tensor costs 16 bytes of
// them: its pointer and this tag. Bits 0-47: start in the flat space (2^48
// elements, far beyond any device memory); 48-49: DType; 50-63: group.
constexpr int kStartBits = 48;
constexpr uint64_t kStartMask = (uint64_t(1) << kStartBits) - 1;
constexpr int kMaxGroups = 1 << 14;
constexpr int64_t kMaxFlatElements = int64_t(kStartMask);

GRADCLIP_HD uint64_t make_tag(int64_t start, int dtype, int group) {
  return uint64_t(start) | (uint64_t(dtype) << kStartBits) | (uint64_t(group) << (kStartBits + 2));
}
GRADCLIP_HD int64_t tag_start(uint64_t tag) { return int64_t(tag & kStartMask); }
GRADCLIP_HD int tag_dtype(uint64_t tag) { return int((tag >> kStartBits) & 3u); }
GRADCLIP_HD int tag_group(uint64_t tag) { return int(tag >> (kStartBits + 2)); }

// ---- blocks and segments ----
GRADCLIP_HD int64_t first_block(int64_t start) { return start / kChunk; }
// One past the last block touching [start, end); start == end touches none.
GRADCLIP_HD int64_t end_block(int64_t start, int64_t end) {
  return end > start ? (end - 1) / kChunk + 1 : first_block(start);
}
GRADCLIP_HD int64_t segment_slot(int64_t tensor, int64_t block) { return tensor + block; }
// Slots needed by n tensors spanning `elements` in all (see the header comment).
GRADCLIP_HD int64_t partial_slots(int64_t n, int64_t elements) {
  return n + (elements + kChunk - 1) / kChunk + 1;
}

// The last tensor t in [0, n) with start(t) <= pos, among tags[0..n] (tags[n]
// marks the end). With empty tensors several share a start: the last of them
// is the non-empty one that owns pos. The loads are the same for every thread
// of a block, so on the device they are broadcasts from the constant bank.
GRADCLIP_HD int find_tensor(const uint64_t* tags, int n, int64_t pos) {
  int lo = 0, hi = n;  // invariant: start(lo) <= pos, and the answer is < hi
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (tag_start(tags[mid]) <= pos) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Calls fn(t, offset, count) for each segment of flat-space block `block`
// among the tensors tags[0..n) (tags[n] marks their end): tensor t's elements
// [offset, offset + count), in tensor order. Empty tensors own no segment.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class Fn>
GRADCLIP_HD void for_each_segment(const uint64_t* tags, int n, int64_t block, Fn&& fn) {
  const int64_t begin = tag_start(tags[0]), end = tag_start(tags[n]);
  int64_t pos = block * kChunk;
  if (pos < begin) pos = begin;
  int64_t hi = (block + 1) * kChunk;
  if (hi > end) hi = end;
  if (pos >= hi) return;
  int t = find_tensor(tags, n, pos);
  while (pos < hi) {
    const int64_t ts = tag_start(tags[t]), te = tag_start(tags[t + 1]);
    const int64_t stop = te < hi ? te : hi;
    fn(t, pos - ts, stop - pos);
    pos = stop;
    ++t;
    while (t < n && tag_start(tags[t + 1]) == tag_start(tags[t])) ++t;
  }
}

// Launch j of a call over n tensors takes tensors [first_tensor, first_tensor
// + count) and flat blocks [first_block, first_block + blocks). blocks is at
// least 1, so that a norm launch always runs and copies its tags.
struct LaunchSlice {
  int64_t first_tensor, count, first_block, blocks;
};

GRADCLIP_HD int64_t launch_count(int64_t n) { return (n + kMaxTensorsPerLaunch - 1) / kMaxTensorsPerLaunch; }

GRADCLIP_HD LaunchSlice launch_slice(const uint64_t* all_tags, int64_t n, int64_t j) {
  LaunchSlice s;
  s.first_tensor = j * kMaxTensorsPerLaunch;
  s.count = n - s.first_tensor < kMaxTensorsPerLaunch ? n - s.first_tensor : kMaxTensorsPerLaunch;
  const int64_t begin = tag_start(all_tags[s.first_tensor]), end = tag_start(all_tags[s.first_tensor + s.count]);
  s.first_block = first_block(begin);
  const int64_t blocks = end_block(begin, end) - s.first_block;
  s.blocks = blocks > 0 ? blocks : 1;
  return s;
}

// The elements [a, e) of one segment as one thread of `threads` sees them: a
// scalar head up to the first 16-byte boundary, aligned vectors, a scalar tail.
// Thread i takes head element i, vectors i, i + threads, ... and tail element i.
struct SegmentSplit {
  int64_t head;     // scalar elements before the first aligned vector
  int64_t vectors;  // aligned vectors of kVectorBytes / elem_bytes elements
  int64_t tail;     // scalar elements after them
};

GRADCLIP_HD SegmentSplit split_segment(uint64_t first_address, int64_t n, int elem_bytes) {
  const int64_t per_vector = kVectorBytes / elem_bytes;
  const int64_t misaligned = int64_t(first_address % kVectorBytes) / elem_bytes;  // elements past a boundary
  int64_t head = misaligned ? per_vector - misaligned : 0;
  // Addresses of elements are multiples of elem_bytes (the intake checks it),
  // so stepping `head` elements lands exactly on a boundary.
  if (head > n) head = n;
  const int64_t vectors = (n - head) / per_vector;
  return {head, vectors, n - head - vectors * per_vector};
}

// Calls scalar(i) for each scalar element and vector(v) for each aligned
// vector (elements head + v * per_vector ...) that thread `thread` of
// `threads` owns, always in this order: head element, vectors v = thread,
// thread + threads, ..., tail element. head and tail are shorter than a vector,
// so a thread has at most one of each.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class Scalar, class Vector>
GRADCLIP_HD void walk_segment(const SegmentSplit& s, int64_t per_vector, int thread, int threads, Scalar&& scalar,
                              Vector&& vector) {
  if (thread < s.head) scalar(int64_t(thread));
#ifdef __CUDACC__
#pragma unroll 4
#endif
  for (int64_t v = thread; v < s.vectors; v += threads) vector(v);
  if (thread < s.tail) scalar(s.head + s.vectors * per_vector + thread);
}

}  // namespace gradclip::cuda_plan
