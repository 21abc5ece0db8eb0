// AVX2 + FMA + F16C kernels (compiled with -mavx2 -mfma -mf16c; run only when the
// CPU reports all three). 16 float64 lanes = four __m256d.
#include <immintrin.h>

#include <type_traits>

#include "cpu/bits16.h"
#include "cpu/isa_kernels.h"

namespace gradclip::cpu::avx2_isa {
namespace {

struct F64v { __m256d v[4]; };
struct F32v { __m256 v[2]; };

static inline void widen(__m256 f, __m256d* out) {
  out[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
  out[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
}
static inline __m256 load8_f16(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
static inline __m256 load8_bf16(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline void store8_f16(f16_t* p, __m256 f) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even, NaN kept quiet: the same rule as float_to_bf16().
static inline void store8_bf16(bf16_t* p, __m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, is_nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

static inline F64v load_f64(const float* p) {
  F64v r;
  widen(_mm256_loadu_ps(p), r.v);
  widen(_mm256_loadu_ps(p + 8), r.v + 2);
  return r;
}
static inline F64v load_f64(const double* p) {
  return {{_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4), _mm256_loadu_pd(p + 8), _mm256_loadu_pd(p + 12)}};
}
static inline F64v load_f64(const f16_t* p) {
  F64v r;
  widen(load8_f16(p), r.v);
  widen(load8_f16(p + 8), r.v + 2);
  return r;
}
static inline F64v load_f64(const bf16_t* p) {
  F64v r;
  widen(load8_bf16(p), r.v);
  widen(load8_bf16(p + 8), r.v + 2);
  return r;
}

static inline F64v zero_f64() { const __m256d z = _mm256_setzero_pd(); return {{z, z, z, z}}; }
static inline F64v add(F64v a, F64v b) { for (int k = 0; k < 4; ++k) a.v[k] = _mm256_add_pd(a.v[k], b.v[k]); return a; }
static inline F64v mul(F64v a, F64v b) { for (int k = 0; k < 4; ++k) a.v[k] = _mm256_mul_pd(a.v[k], b.v[k]); return a; }
static inline F64v abs_v(F64v a) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  for (int k = 0; k < 4; ++k) a.v[k] = _mm256_andnot_pd(sign, a.v[k]);
  return a;
}
static inline F64v max_v(F64v a, F64v b) { for (int k = 0; k < 4; ++k) a.v[k] = _mm256_max_pd(a.v[k], b.v[k]); return a; }
static inline F64v unordered_or(F64v acc, F64v x) {
  for (int k = 0; k < 4; ++k) acc.v[k] = _mm256_or_pd(acc.v[k], _mm256_cmp_pd(x.v[k], x.v[k], _CMP_UNORD_Q));
  return acc;
}
static inline void store_lanes(double* out, F64v a) { for (int k = 0; k < 4; ++k) _mm256_store_pd(out + 4 * k, a.v[k]); }

// Compute-type vectors: float32 for float/f16/bf16 data, float64 for double.
static inline F32v load_c(const float* p) { return {{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}}; }
static inline F32v load_c(const f16_t* p) { return {{load8_f16(p), load8_f16(p + 8)}}; }
static inline F32v load_c(const bf16_t* p) { return {{load8_bf16(p), load8_bf16(p + 8)}}; }
static inline F64v load_c(const double* p) { return load_f64(p); }
static inline void store_c(float* p, F32v a) { _mm256_storeu_ps(p, a.v[0]); _mm256_storeu_ps(p + 8, a.v[1]); }
static inline void store_c(f16_t* p, F32v a) { store8_f16(p, a.v[0]); store8_f16(p + 8, a.v[1]); }
static inline void store_c(bf16_t* p, F32v a) { store8_bf16(p, a.v[0]); store8_bf16(p + 8, a.v[1]); }
static inline void store_c(double* p, F64v a) { for (int k = 0; k < 4; ++k) _mm256_storeu_pd(p + 4 * k, a.v[k]); }

static inline F32v mul_c(F32v a, float s) {
  const __m256 c = _mm256_set1_ps(s);
  return {{_mm256_mul_ps(a.v[0], c), _mm256_mul_ps(a.v[1], c)}};
}
static inline F64v mul_c(F64v a, double s) {
  const __m256d c = _mm256_set1_pd(s);
  for (int k = 0; k < 4; ++k) a.v[k] = _mm256_mul_pd(a.v[k], c);
  return a;
}
// max(lo, v) and min(hi, .) return their second operand when either is NaN, so
// a NaN element passes through unchanged.
static inline F32v clamp_c(F32v a, float lo, float hi) {
  const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
  for (int k = 0; k < 2; ++k) a.v[k] = _mm256_min_ps(h, _mm256_max_ps(l, a.v[k]));
  return a;
}
static inline F64v clamp_c(F64v a, double lo, double hi) {
  const __m256d l = _mm256_set1_pd(lo), h = _mm256_set1_pd(hi);
  for (int k = 0; k < 4; ++k) a.v[k] = _mm256_min_pd(h, _mm256_max_pd(l, a.v[k]));
  return a;
}
static inline bool outside_c(F32v a, float lo, float hi) {
  const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
  __m256 m = _mm256_setzero_ps();
  for (int k = 0; k < 2; ++k)
    m = _mm256_or_ps(m, _mm256_or_ps(_mm256_cmp_ps(a.v[k], l, _CMP_LT_OQ), _mm256_cmp_ps(a.v[k], h, _CMP_GT_OQ)));
  return _mm256_movemask_ps(m) != 0;
}
static inline bool outside_c(F64v a, double lo, double hi) {
  const __m256d l = _mm256_set1_pd(lo), h = _mm256_set1_pd(hi);
  __m256d m = _mm256_setzero_pd();
  for (int k = 0; k < 4; ++k)
    m = _mm256_or_pd(m, _mm256_or_pd(_mm256_cmp_pd(a.v[k], l, _CMP_LT_OQ), _mm256_cmp_pd(a.v[k], h, _CMP_GT_OQ)));
  return _mm256_movemask_pd(m) != 0;
}

// 16-bit clamp on raw patterns (cpu/bits16.h): 16 lanes per __m256i, masks as
// all-ones lanes.
constexpr int kLanes16 = 16;
using B16v = __m256i;
using M16 = __m256i;
static inline B16v load_b16(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline void store_b16(uint16_t* p, B16v a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
static inline B16v splat_b16(uint16_t b) { return _mm256_set1_epi16(static_cast<int16_t>(b)); }
// sign_epi16(mag, bits) negates mag where bits < 0, i.e. where the sign bit is set
// (where bits == 0 it gives 0, and mag is 0 there anyway).
static inline B16v key_b16(B16v a) { return _mm256_sign_epi16(_mm256_and_si256(a, _mm256_set1_epi16(0x7fff)), a); }
// mag <= inf as inf + 1 > mag: AVX2 has only a signed greater-than, and both
// sides stay below 0x8000. The + 1 is loop-invariant.
static inline M16 ordered_b16(B16v a, B16v inf) {
  return _mm256_cmpgt_epi16(_mm256_add_epi16(inf, _mm256_set1_epi16(1)), _mm256_and_si256(a, _mm256_set1_epi16(0x7fff)));
}
static inline M16 lt_b16(M16 ok, B16v a, B16v b) { return _mm256_and_si256(ok, _mm256_cmpgt_epi16(b, a)); }
static inline bool any_b16(M16 a, M16 b) {
  const __m256i m = _mm256_or_si256(a, b);
  return !_mm256_testz_si256(m, m);
}
static inline B16v select_b16(B16v a, M16 m, B16v with) { return _mm256_blendv_epi8(a, with, m); }

#include "cpu/kernels_impl.h"

}  // namespace
}  // namespace gradclip::cpu::avx2_isa

namespace gradclip::cpu {
const IsaKernels& avx2_kernels() {
  static constexpr IsaKernels table = avx2_isa::make_table("avx2");
  return table;
}
}  // namespace gradclip::cpu
