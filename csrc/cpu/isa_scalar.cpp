// Baseline kernels: plain C++ over 16-lane arrays. The compiler may use SSE2 for
// these loops, but every lane does exactly the IEEE operations the contract in
// isa_kernels.h names, so results match the SIMD files bit for bit.
#include <type_traits>

#include "cpu/bits16.h"
#include "cpu/isa_kernels.h"

namespace gradclip::cpu::scalar_isa {
namespace {

struct F64v { double v[kLanes]; };
template <class S> struct Vec16 { S v[kLanes]; };
using F32v = Vec16<float>;

static inline F64v load_f64(const float* p) { F64v r; for (int k = 0; k < kLanes; ++k) r.v[k] = p[k]; return r; }
static inline F64v load_f64(const double* p) { F64v r; for (int k = 0; k < kLanes; ++k) r.v[k] = p[k]; return r; }
static inline F64v load_f64(const f16_t* p) { F64v r; for (int k = 0; k < kLanes; ++k) r.v[k] = f16_to_float(p[k].bits); return r; }
static inline F64v load_f64(const bf16_t* p) { F64v r; for (int k = 0; k < kLanes; ++k) r.v[k] = bf16_to_float(p[k].bits); return r; }

static inline F64v zero_f64() { F64v r; for (int k = 0; k < kLanes; ++k) r.v[k] = 0.0; return r; }
static inline F64v add(F64v a, F64v b) { for (int k = 0; k < kLanes; ++k) a.v[k] += b.v[k]; return a; }
static inline F64v mul(F64v a, F64v b) { for (int k = 0; k < kLanes; ++k) a.v[k] *= b.v[k]; return a; }
static inline F64v abs_v(F64v a) { for (int k = 0; k < kLanes; ++k) a.v[k] = __builtin_fabs(a.v[k]); return a; }
static inline F64v max_v(F64v a, F64v b) { for (int k = 0; k < kLanes; ++k) a.v[k] = b.v[k] > a.v[k] ? b.v[k] : a.v[k]; return a; }
static inline F64v unordered_or(F64v acc, F64v x) {
  for (int k = 0; k < kLanes; ++k)
    if (x.v[k] != x.v[k]) acc.v[k] = __builtin_nan("");  // any nonzero bit pattern marks the lane
  return acc;
}
static inline void store_lanes(double* out, F64v a) { for (int k = 0; k < kLanes; ++k) out[k] = a.v[k]; }

template <class T>
static inline auto load_c(const T* p) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  Vec16<C> r;
  for (int k = 0; k < kLanes; ++k) {
    if constexpr (std::is_same_v<T, f16_t>) r.v[k] = f16_to_float(p[k].bits);
    else if constexpr (std::is_same_v<T, bf16_t>) r.v[k] = bf16_to_float(p[k].bits);
    else r.v[k] = p[k];
  }
  return r;
}
template <class T, class C>
static inline void store_c(T* p, Vec16<C> a) {
  for (int k = 0; k < kLanes; ++k) {
    if constexpr (std::is_same_v<T, f16_t>) p[k].bits = float_to_f16(a.v[k]);
    else if constexpr (std::is_same_v<T, bf16_t>) p[k].bits = float_to_bf16(a.v[k]);
    else p[k] = a.v[k];
  }
}
template <class C>
static inline Vec16<C> mul_c(Vec16<C> a, C s) { for (int k = 0; k < kLanes; ++k) a.v[k] *= s; return a; }
template <class C>
static inline Vec16<C> clamp_c(Vec16<C> a, C lo, C hi) {
  for (int k = 0; k < kLanes; ++k) {
    if (a.v[k] < lo) a.v[k] = lo;
    else if (a.v[k] > hi) a.v[k] = hi;
  }
  return a;
}
template <class C>
static inline bool outside_c(Vec16<C> a, C lo, C hi) {
  bool out = false;
  for (int k = 0; k < kLanes; ++k) out |= (a.v[k] < lo) | (a.v[k] > hi);
  return out;
}

// 16-bit clamp on raw patterns: 16 lanes, each the scalar rule of cpu/bits16.h.
constexpr int kLanes16 = kLanes;
using B16v = Vec16<uint16_t>;
using M16 = Vec16<bool>;
static inline B16v load_b16(const uint16_t* p) { B16v r; for (int k = 0; k < kLanes16; ++k) r.v[k] = p[k]; return r; }
static inline void store_b16(uint16_t* p, B16v a) { for (int k = 0; k < kLanes16; ++k) p[k] = a.v[k]; }
static inline B16v splat_b16(uint16_t b) { B16v r; for (int k = 0; k < kLanes16; ++k) r.v[k] = b; return r; }
static inline B16v key_b16(B16v a) { for (int k = 0; k < kLanes16; ++k) a.v[k] = uint16_t(order_key16(a.v[k])); return a; }
static inline M16 ordered_b16(B16v a, B16v inf) {
  M16 r;
  for (int k = 0; k < kLanes16; ++k) r.v[k] = (a.v[k] & 0x7fff) <= inf.v[k];
  return r;
}
static inline M16 lt_b16(M16 ok, B16v a, B16v b) {
  for (int k = 0; k < kLanes16; ++k) ok.v[k] = ok.v[k] && int16_t(a.v[k]) < int16_t(b.v[k]);
  return ok;
}
static inline bool any_b16(M16 a, M16 b) {
  bool r = false;
  for (int k = 0; k < kLanes16; ++k) r |= a.v[k] | b.v[k];
  return r;
}
static inline B16v select_b16(B16v a, M16 m, B16v with) {
  for (int k = 0; k < kLanes16; ++k) if (m.v[k]) a.v[k] = with.v[k];
  return a;
}

#include "cpu/kernels_impl.h"

}  // namespace
}  // namespace gradclip::cpu::scalar_isa

namespace gradclip::cpu {
const IsaKernels& scalar_kernels() {
  static constexpr IsaKernels table = scalar_isa::make_table("scalar");
  return table;
}
}  // namespace gradclip::cpu
