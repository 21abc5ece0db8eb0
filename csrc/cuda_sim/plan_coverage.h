// A check of the CUDA kernels' plan (plan.h) on its own, in gradclip._cuda_sim:
// it walks the launch slices, blocks, segments and per-thread element splits
// the kernels walk, counting visits instead of reading memory, so it can
// cover sizes, misalignments and list lengths that running the kernels on the
// host (simt.h) could not afford, and planted walk bugs show it is live.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gradclip::cuda_plan {

// Coverage check: tensors of these sizes (elements), element sizes (bytes)
// and byte misalignments (from a 16-byte boundary). Returns a description of
// every broken rule (empty: every element is visited exactly once, every slot
// is written once, and the finalize reads exactly the slots written for each
// tensor). `plant` breaks the walk on purpose ("skip_tail", "double_head",
// "slot_shift") to show the check notices.
std::vector<std::string> check_coverage(const std::vector<int64_t>& numels, const std::vector<int>& elem_bytes,
                                        const std::vector<int>& misalign, const std::string& plant = "");

}  // namespace gradclip::cuda_plan
