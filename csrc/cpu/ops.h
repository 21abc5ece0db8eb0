// CPU operations over a list of dense spans: chunking, threading, the
// overflow-safe norm, and in-place updates. No Python or framework types.
#pragma once

#include <vector>

#include "core/types.h"

namespace gradclip::cpu {

struct Norms {
  std::vector<double> per_span;  // the p-norm of each span
  double total;                  // the p-norm of all spans together
};

// Results do not depend on the thread count or the ISA (see isa_kernels.h).
// Finite inputs never give an inf norm unless the true norm exceeds float64.
Norms compute_norms(const std::vector<Span>& spans, NormOrder order);

// spans[i] *= coefs[i]; spans whose coefficient is exactly 1 are not touched.
void scale(const std::vector<Span>& spans, const std::vector<double>& coefs);

// Clamps every element to [-limit, limit], the bound first rounded to each
// span's dtype. Returns true when some element changed. Symmetric on purpose:
// it then commutes with negation, which negative-bit views rely on (intake.cpp).
bool clamp_symmetric(const std::vector<Span>& spans, double limit);

}  // namespace gradclip::cpu
