// Value clamp of float16 / bfloat16 data on the raw 16-bit patterns: the scalar
// pieces every ISA shares (the element loop, and the scalar ISA's lanes). The
// vector forms live in each isa_*.cpp; the loop body is clamp_bits16() in
// kernels_impl.h.
//
// Why raw bits: the clamp bounds are values of the element type, so an element
// is either kept or replaced by a bound's exact pattern. Nothing needs float32
// arithmetic. Skipping the widen/narrow round trip keeps every NaN's bits (a
// signalling NaN came back quiet from it) and lets one integer compare cover
// twice as many elements per register (32 per zmm, 16 per ymm).
//
// Order key: a 16-bit float is sign + magnitude. Reading the magnitude as an
// integer, negated when the sign bit is set, gives a key whose order is the
// float order and whose equality is float equality: -0.0 and +0.0 both map to
// 0, so -0.0 against a bound of +0.0 is "equal" (kept), as a float compare says.
// (The usual bits ^ (sign ? 0x7fff : 0) key puts -0.0 one below +0.0 and would
// rewrite a -0.0 element when lo = +0.0.) Magnitudes are at most 0x7fff, so the
// negation cannot overflow an int16.
//
// NaN: magnitudes above the inf pattern. Their keys sort beyond +-inf, so every
// compare is restricted to ordered lanes and a NaN keeps its bits (sign,
// payload, signalling bit).
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/types.h"

namespace gradclip::cpu {

// The inf pattern of each 16-bit type: a larger magnitude is a NaN.
template <class T> constexpr uint16_t kInfBits16 = std::is_same_v<T, f16_t> ? 0x7c00 : 0x7f80;

static inline int16_t order_key16(uint16_t b) {
  const int16_t mag = int16_t(b & 0x7fff);
  return (b & 0x8000) ? int16_t(-mag) : mag;
}

// One clamp, in the forms the loops need.
struct Bits16Clamp {
  uint16_t lo, hi;          // the bounds' own patterns: what a clamped element becomes
  int16_t lo_key, hi_key;   // their order keys
  uint16_t inf;             // kInfBits16<T>
};

// lo and hi must already be values of T (the caller rounds them), so the
// conversion to T's pattern is exact.
template <class T>
static inline Bits16Clamp bits16_clamp(double lo, double hi) {
  Bits16Clamp c;
  if constexpr (std::is_same_v<T, f16_t>) {
    c.lo = float_to_f16(static_cast<float>(lo));
    c.hi = float_to_f16(static_cast<float>(hi));
  } else {
    c.lo = float_to_bf16(static_cast<float>(lo));
    c.hi = float_to_bf16(static_cast<float>(hi));
  }
  c.lo_key = order_key16(c.lo);
  c.hi_key = order_key16(c.hi);
  c.inf = kInfBits16<T>;
  return c;
}

// One element; true when it was outside and rewritten. Below is tested first,
// and the vector bodies give `below` the last word too, so every path agrees
// even for lo > hi (which no caller passes).
static inline bool clamp_one16(uint16_t* p, const Bits16Clamp& c) {
  const uint16_t b = *p;
  if ((b & 0x7fff) > c.inf) return false;  // NaN: never outside
  const int16_t key = order_key16(b);
  if (key < c.lo_key) { *p = c.lo; return true; }
  if (key > c.hi_key) { *p = c.hi; return true; }
  return false;
}

}  // namespace gradclip::cpu
