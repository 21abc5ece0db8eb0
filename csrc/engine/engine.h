// The clip engine: one typed request, one typed outcome, and the backend
// interface the CPU and CUDA backends implement. No Python or framework types.
//
// Every clip is the same three stages:
//   reduce    each tensor's power sum (sum |x|^p, or max |x|), folded per
//             group: the "local power sums"
//   finish    power sums -> norms (per tensor, per group, total), the
//             nonfinite decision and the coefficients (core/clip_rules.h),
//             then the writes: scale or clamp (none when nothing needs it)
// Between the two sits the seam: a caller may take each group's partial power
// sum (core/partial.h), combine it with other devices' or processes' (a
// collective), and finish with the combined partials, so that every rule
// after the combine is the engine's own. run() is reduce + finish with no
// combine; the Python layer reaches the seam through gradclip._core.reduce.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/clip_rules.h"
#include "core/partial.h"
#include "core/types.h"

namespace gradclip::engine {

// A norm given by the caller instead of computed (torch's
// clip_grads_with_norm_): a number, or one element in memory on the tensors'
// device (read there: on CUDA without a host sync).
struct GivenNorm {
  bool present = false;
  double value = 0.0;
  const Span* in_memory = nullptr;
};

struct Request {
  ClipKind kind = ClipKind::kNone;
  NormOrder order = NormOrder::from_p(2.0);
  double eps = 0.0;
  std::vector<double> limits;  // one per group (max norm, target norm or clip value); none for kNone
  Grouping groups;             // each span's group; n_groups == 0: one group, no per-group norms
  Nonfinite nonfinite = Nonfinite::kPropagate;
  // The total is reported as float32 (no input is float64): a total past
  // float32's range counts as nonfinite (finite_as_reported).
  bool total_as_float32 = true;
  GivenNorm given;  // kGlobal only: scale by this norm's coefficient, without a reduction

  // What the caller reads; the rest need not be produced.
  bool want_per_span = false;  // per-span norms
  // A full report on the host: norms per span and group, coefficients,
  // nonfinite flags (training records; on CUDA one host sync).
  bool want_report = false;
  bool want_changed = false;  // kValue: whether some element changed

  int32_t n_groups() const { return groups.n_groups > 0 ? groups.n_groups : 1; }
  int32_t group_of(size_t span) const { return groups.n_groups > 0 ? groups.group_of_span[span] : 0; }
  // Whether the call computes norms: a value clip needs them only for a report.
  bool reduces() const { return !given.present && (kind != ClipKind::kValue || want_report); }
};

// Where a backend left its results in device memory (CUDA without a report):
// byte offsets into one output buffer, -1 when absent.
struct DeviceResults {
  bool present = false;
  bool f64 = false;  // norms stored as float64 (else float32)
  int64_t total_offset = -1, group_offset = -1, tensor_offset = -1, flags_offset = -1;
  int64_t flag_count = 0;  // kValue: one changed-flag byte per block
};

struct Outcome {
  // Host results (absent fields are empty / zero).
  double total = 0.0;
  std::vector<double> per_span;     // norms, per unique span
  std::vector<double> per_group;    // norms, per group (grouped requests)
  std::vector<double> group_coefs;  // kGlobal / kNormalize with a report: each group's factor
  std::vector<double> span_coefs;   // with a report: the factor each span was (or, when held, would be) scaled by
  std::vector<char> nonfinite_spans;  // with a report: spans whose norm was NaN or inf before any repair
  bool nonfinite = false;  // some norm was NaN or inf (as reported)
  bool held = false;       // and so nothing was written (Nonfinite::kHold)
  bool written = false;    // some element was changed (known on the host only)
  bool changed = false;    // kValue: some element was clamped
  int64_t zeroed = 0;      // elements set to 0 by Nonfinite::kZero
  DeviceResults device;
};

struct GroupPartials {
  std::vector<Partial> host;
  int64_t device_offset = -1;
};

// One backend's view of one call's spans (unique, in list order).
class Backend {
 public:
  virtual ~Backend() = default;
  // Stage 1, for req.order and req.groups (and kZero's repair).
  virtual void reduce(const Request& req) = 0;
  // After reduce: each group's partial power sum (n_groups Partials), in host
  // memory (CPU) or in the device's (CUDA: at a byte offset of the output
  // buffer, where it stays, so that a collective can combine it there).
  virtual GroupPartials group_partials(const Request& req) = 0;
  // After reduce: the local total (after kZero's repair) and whether some
  // norm was nonfinite, on the host (CUDA: waits for the device).
  struct Summary {
    double total;
    bool nonfinite;
  };
  virtual Summary summary(const Request& req) = 0;
  // Stage 2 and 3. `combined`: the group partials of every participant of a
  // combine (devices, processes), this backend's own among them, as k stacked
  // arrays of n_groups Partials (a float64 span of 2 * n_groups * k elements
  // in this backend's memory), or null. They are folded in stack order, so
  // that every participant finishing with the same stack computes the same
  // norms and takes the same decisions.
  virtual Outcome finish(const Request& req, const Span* combined) = 0;
};

// reduce (when the request needs norms), then finish without a combine.
Outcome run(Backend& backend, const Request& req);

}  // namespace gradclip::engine
