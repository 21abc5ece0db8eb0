// CPU operations over a list of dense spans: chunking, threading, the
// overflow-safe norm, and in-place updates. No Python or framework types.
#pragma once

#include <cstdint>
#include <vector>

#include "core/types.h"

namespace gradclip::cpu {

struct Norms {
  std::vector<double> per_span;   // the p-norm of each span
  double total;                   // the p-norm of all spans together
  std::vector<double> per_group;  // the p-norm of each group's spans (when grouped)
  std::vector<double> power_sum;  // per span, the unrooted sum: lets renorm_spans redo a few spans
};

// Power sums of some spans computed beforehand (by a NormStream): known[s]
// says whether value[s] is span s's power sum.
struct KnownPowerSums {
  std::vector<char> known;
  std::vector<double> value;
};

// Below this much work, waking the thread pool costs more than it saves.
constexpr int64_t kParallelMinElems = int64_t(1) << 18;

// Results do not depend on the thread count or the ISA (see isa_kernels.h).
// Finite inputs never give an inf norm unless the true norm exceeds float64,
// for any p (see core/norm_rescue.h).
// A group's norm is computed exactly as the total is, over that group's spans.
// Power sums in `known` are taken as they are; only the other spans are read.
Norms compute_norms(const std::vector<Span>& spans, NormOrder order, const Grouping& groups = {},
                    const KnownPowerSums* known = nullptr);

// One span's power sum (sum |x|^p, or max |x| for the inf norm) with the
// kernels of `isa`, on the calling thread: bit for bit what compute_norms sums
// for it with the same kernels.
struct IsaKernels;
double span_power_sum(const IsaKernels& isa, const Span& s, NormOrder order);

// The norm of a vector made of several parts, from the parts' own norms.
double combine_norms(const std::vector<double>& norms, NormOrder order);

// Recomputes the norms of the selected spans only (after they were modified)
// and, from them and the others' saved power sums, every total.
void renorm_spans(const std::vector<Span>& spans, NormOrder order, const std::vector<char>& selected,
                  const Grouping& groups, Norms& norms);

// Sets every NaN and inf element of the selected spans to +0; returns how many.
int64_t zero_nonfinite(const std::vector<Span>& spans, const std::vector<char>& selected);

// spans[i] *= coefs[i]; spans whose coefficient is exactly 1 are not touched.
void scale(const std::vector<Span>& spans, const std::vector<double>& coefs);

// Clamps every element of span i to [-limits[i], limits[i]], the bound first
// rounded to the span's dtype. Returns true when some element changed. Symmetric
// on purpose: it then commutes with negation, which negative-bit views rely on
// (intake.cpp).
bool clamp_symmetric(const std::vector<Span>& spans, const std::vector<double>& limits);

}  // namespace gradclip::cpu
