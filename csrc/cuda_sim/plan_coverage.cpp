#include "cuda_sim/plan_coverage.h"

#include <map>

#include "cuda/plan.h"

namespace gradclip::cuda_plan {
namespace {

std::vector<uint64_t> tags_of(const std::vector<int64_t>& numels) {
  std::vector<uint64_t> tags(numels.size() + 1);
  int64_t pos = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    tags[t] = make_tag(pos, 0, 0);
    pos += numels[t];
  }
  tags[numels.size()] = make_tag(pos, 0, 0);
  return tags;
}

// Calls seg(global_tensor, block, offset, count) for every segment of every
// launch of a call, in launch and block order.
template <class Fn>
void for_each_launch_segment(const std::vector<uint64_t>& tags, Fn&& seg) {
  const int64_t n = int64_t(tags.size()) - 1;
  for (int64_t j = 0; j < launch_count(n); ++j) {
    const LaunchSlice sl = launch_slice(tags.data(), n, j);
    for (int64_t b = sl.first_block; b < sl.first_block + sl.blocks; ++b)
      for_each_segment(tags.data() + sl.first_tensor, int(sl.count), b,
                       [&](int t, int64_t offset, int64_t count) { seg(sl.first_tensor + t, b, offset, count); });
  }
}

}  // namespace

std::vector<std::string> check_coverage(const std::vector<int64_t>& numels, const std::vector<int>& elem_bytes,
                                        const std::vector<int>& misalign, const std::string& plant) {
  std::vector<std::string> errors;
  const int64_t n = int64_t(numels.size());
  const std::vector<uint64_t> tags = tags_of(numels);
  std::vector<std::vector<uint8_t>> visits(n);
  for (int64_t t = 0; t < n; ++t) visits[t].assign(numels[t], 0);
  std::map<int64_t, int64_t> slot_owner;  // slot -> tensor
  std::vector<std::vector<int64_t>> slots_written(n);

  for_each_launch_segment(tags, [&](int64_t t, int64_t block, int64_t offset, int64_t count) {
    int64_t slot = segment_slot(t, block);
    if (plant == "slot_shift" && t == n - 1) slot -= 1;
    if (!slot_owner.emplace(slot, t).second)
      errors.push_back("slot " + std::to_string(slot) + " written twice (tensors " + std::to_string(slot_owner[slot]) +
                       " and " + std::to_string(t) + ")");
    slots_written[t].push_back(slot);
    const int es = elem_bytes[t];
    const uint64_t address = 4096 * uint64_t(t + 1) + uint64_t(misalign[t]) + uint64_t(offset) * es;
    const SegmentSplit sp = split_segment(address, count, es);
    const int64_t per_vector = kVectorBytes / es;
    if ((address + uint64_t(sp.head) * es) % kVectorBytes != 0 && sp.vectors > 0)
      errors.push_back("tensor " + std::to_string(t) + ": vectors not 16-byte aligned");
    auto mark = [&](int64_t i) {
      if (i < 0 || i >= count) errors.push_back("tensor " + std::to_string(t) + ": element outside its segment");
      else ++visits[t][offset + i];
    };
    for (int thread = 0; thread < kThreads; ++thread) {
      SegmentSplit walked = sp;
      if (plant == "skip_tail") walked.tail = 0;
      walk_segment(
          walked, per_vector, thread, kThreads,
          [&](int64_t i) {
            mark(i);
            if (plant == "double_head" && i == 0) mark(i);
          },
          [&](int64_t v) {
            for (int64_t k = 0; k < per_vector; ++k) mark(sp.head + v * per_vector + k);
          });
    }
  });

  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < numels[t]; ++i)
      if (visits[t][i] != 1) {
        errors.push_back("tensor " + std::to_string(t) + " element " + std::to_string(i) + " visited " +
                         std::to_string(visits[t][i]) + " times");
        break;
      }
    // The finalize's view of tensor t: slots t + b for its blocks, in order.
    const int64_t s = tag_start(tags[t]), e = tag_start(tags[t + 1]);
    std::vector<int64_t> expected;
    for (int64_t b = first_block(s); b < end_block(s, e); ++b) expected.push_back(segment_slot(t, b));
    if (expected != slots_written[t])
      errors.push_back("tensor " + std::to_string(t) + ": the finalize reads other slots than were written");
  }
  if (!slot_owner.empty() && slot_owner.rbegin()->first >= partial_slots(n, tag_start(tags[n])))
    errors.push_back("a slot lies past the partials array");
  return errors;
}

}  // namespace gradclip::cuda_plan
