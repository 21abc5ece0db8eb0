// A host emulation of the CUDA kernels' plan (plan.h), compiled into
// gradclip._core so that the tests can check the index arithmetic and the
// overflow-safe folding on any machine, GPU or not. It walks the same launch
// slices, blocks, segments and per-thread element splits the kernels walk,
// with the same partial slots and the same fold order in the finalize step
// (threads are visited one after another instead of in shuffle trees).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/types.h"

namespace gradclip::cuda_plan {

// Coverage check: tensors of these sizes (elements), element sizes (bytes)
// and byte misalignments (from a 16-byte boundary). Returns a description of
// every broken rule (empty: every element is visited exactly once, every slot
// is written once, and the finalize reads exactly the slots written for each
// tensor). `plant` breaks the walk on purpose ("skip_tail", "double_head",
// "slot_shift") to show the check notices.
std::vector<std::string> check_coverage(const std::vector<int64_t>& numels, const std::vector<int>& elem_bytes,
                                        const std::vector<int>& misalign, const std::string& plant = "");

struct EmulatedNorms {
  std::vector<double> per_span;
  double total;
  int64_t rescued_segments;
};

// The norms the kernels would compute for these spans (host memory), p > 0 or inf.
EmulatedNorms emulate_norms(const std::vector<Span>& spans, NormOrder order);

}  // namespace gradclip::cuda_plan
