// AVX-512 (F, BW, VL, DQ) kernels, compiled twice: isa_avx512.cpp as they are,
// and isa_avx512bf16.cpp with GRADCLIP_AVX512_NATIVE_BF16, where bfloat16 results
// are rounded by the AVX512_BF16 conversion instruction. Each is built on every
// x86-64 compiler that knows the flags, even where the build machine lacks the
// instructions, and run only when the CPU reports them (dispatch.cpp).
// 16 float64 lanes = two __m512d.
//
// The including file defines GRADCLIP_AVX512_ISA_NS (the namespace), the table
// function GRADCLIP_AVX512_TABLE_FN and GRADCLIP_AVX512_ISA_NAME.
#include <immintrin.h>

#include <type_traits>

#include "cpu/bits16.h"
#include "cpu/isa_kernels.h"

namespace gradclip::cpu::GRADCLIP_AVX512_ISA_NS {
namespace {

struct F64v { __m512d v[2]; };
struct F32v { __m512 v; };

static inline __m512 load16_f16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 load16_bf16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline F64v widen(__m512 f) {
  return {{_mm512_cvtps_pd(_mm512_castps512_ps256(f)),
           _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)))}};
}

static inline F64v load_f64(const float* p) { return widen(_mm512_loadu_ps(p)); }
static inline F64v load_f64(const double* p) { return {{_mm512_loadu_pd(p), _mm512_loadu_pd(p + 8)}}; }
static inline F64v load_f64(const f16_t* p) { return widen(load16_f16(p)); }
static inline F64v load_f64(const bf16_t* p) { return widen(load16_bf16(p)); }

static inline F64v zero_f64() { const __m512d z = _mm512_setzero_pd(); return {{z, z}}; }
static inline F64v add(F64v a, F64v b) { return {{_mm512_add_pd(a.v[0], b.v[0]), _mm512_add_pd(a.v[1], b.v[1])}}; }
static inline F64v mul(F64v a, F64v b) { return {{_mm512_mul_pd(a.v[0], b.v[0]), _mm512_mul_pd(a.v[1], b.v[1])}}; }
static inline F64v abs_v(F64v a) { return {{_mm512_abs_pd(a.v[0]), _mm512_abs_pd(a.v[1])}}; }
static inline F64v max_v(F64v a, F64v b) { return {{_mm512_max_pd(a.v[0], b.v[0]), _mm512_max_pd(a.v[1], b.v[1])}}; }
static inline F64v unordered_or(F64v acc, F64v x) {
  const __m512i ones = _mm512_set1_epi64(-1);
  for (int k = 0; k < 2; ++k) {
    const __mmask8 m = _mm512_cmp_pd_mask(x.v[k], x.v[k], _CMP_UNORD_Q);
    acc.v[k] = _mm512_castsi512_pd(_mm512_mask_mov_epi64(_mm512_castpd_si512(acc.v[k]), m, ones));
  }
  return acc;
}
static inline void store_lanes(double* out, F64v a) { _mm512_store_pd(out, a.v[0]); _mm512_store_pd(out + 8, a.v[1]); }

static inline F32v load_c(const float* p) { return {_mm512_loadu_ps(p)}; }
static inline F32v load_c(const f16_t* p) { return {load16_f16(p)}; }
static inline F32v load_c(const bf16_t* p) { return {load16_bf16(p)}; }
static inline F64v load_c(const double* p) { return load_f64(p); }
static inline void store_c(float* p, F32v a) { _mm512_storeu_ps(p, a.v); }
static inline void store_c(f16_t* p, F32v a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even, NaN kept quiet: the same rule as float_to_bf16().
static inline __m256i bf16_rne_software(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, quiet));
}
static inline void store_c(bf16_t* p, F32v a) {
#if defined(GRADCLIP_AVX512_NATIVE_BF16)
  // VCVTNEPS2BF16 rounds to nearest even and quiets NaNs exactly as the software
  // rule does, but it treats subnormal float32 inputs as zero. A product that
  // fell below FLT_MIN is rare (|x * coef| < 1.2e-38), so one class test per 16
  // lanes sends just those vectors to the software rule: the bits stay equal
  // to every other ISA's.
  const __m256i r = _mm512_fpclass_ps_mask(a.v, 0x20 /* subnormal */)
                        ? bf16_rne_software(a.v)
                        : (__m256i)_mm512_cvtneps_pbh(a.v);
#else
  const __m256i r = bf16_rne_software(a.v);
#endif
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), r);
}
static inline void store_c(double* p, F64v a) { _mm512_storeu_pd(p, a.v[0]); _mm512_storeu_pd(p + 8, a.v[1]); }

static inline F32v mul_c(F32v a, float s) { return {_mm512_mul_ps(a.v, _mm512_set1_ps(s))}; }
static inline F64v mul_c(F64v a, double s) {
  const __m512d c = _mm512_set1_pd(s);
  return {{_mm512_mul_pd(a.v[0], c), _mm512_mul_pd(a.v[1], c)}};
}
// max(lo, v) / min(hi, .) return the second operand when either is NaN: NaN passes through.
static inline F32v clamp_c(F32v a, float lo, float hi) {
  return {_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), a.v))};
}
static inline F64v clamp_c(F64v a, double lo, double hi) {
  const __m512d l = _mm512_set1_pd(lo), h = _mm512_set1_pd(hi);
  return {{_mm512_min_pd(h, _mm512_max_pd(l, a.v[0])), _mm512_min_pd(h, _mm512_max_pd(l, a.v[1]))}};
}
static inline bool outside_c(F32v a, float lo, float hi) {
  return (_mm512_cmp_ps_mask(a.v, _mm512_set1_ps(lo), _CMP_LT_OQ) |
          _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(hi), _CMP_GT_OQ)) != 0;
}
static inline bool outside_c(F64v a, double lo, double hi) {
  const __m512d l = _mm512_set1_pd(lo), h = _mm512_set1_pd(hi);
  int m = 0;
  for (int k = 0; k < 2; ++k)
    m |= _mm512_cmp_pd_mask(a.v[k], l, _CMP_LT_OQ) | _mm512_cmp_pd_mask(a.v[k], h, _CMP_GT_OQ);
  return m != 0;
}

// 16-bit clamp on raw patterns (cpu/bits16.h): 32 lanes per zmm, AVX-512BW mask
// compares.
constexpr int kLanes16 = 32;
using B16v = __m512i;
using M16 = __mmask32;
static inline B16v load_b16(const uint16_t* p) { return _mm512_loadu_si512(p); }
static inline void store_b16(uint16_t* p, B16v a) { _mm512_storeu_si512(p, a); }
static inline B16v splat_b16(uint16_t b) { return _mm512_set1_epi16(static_cast<int16_t>(b)); }
// The magnitude, negated (0 - mag) in the lanes whose sign bit is set.
static inline B16v key_b16(B16v a) {
  const __m512i mag = _mm512_and_si512(a, _mm512_set1_epi16(0x7fff));
  return _mm512_mask_sub_epi16(mag, _mm512_movepi16_mask(a), _mm512_setzero_si512(), mag);
}
static inline M16 ordered_b16(B16v a, B16v inf) {
  return _mm512_cmple_epu16_mask(_mm512_and_si512(a, _mm512_set1_epi16(0x7fff)), inf);
}
static inline M16 lt_b16(M16 ok, B16v a, B16v b) { return _mm512_mask_cmplt_epi16_mask(ok, a, b); }
static inline bool any_b16(M16 a, M16 b) { return (a | b) != 0; }
static inline B16v select_b16(B16v a, M16 m, B16v with) { return _mm512_mask_mov_epi16(a, m, with); }

#include "cpu/kernels_impl.h"

}  // namespace
}  // namespace gradclip::cpu::GRADCLIP_AVX512_ISA_NS

namespace gradclip::cpu {
const IsaKernels& GRADCLIP_AVX512_TABLE_FN() {
  static constexpr IsaKernels table = GRADCLIP_AVX512_ISA_NS::make_table(GRADCLIP_AVX512_ISA_NAME);
  return table;
}
}  // namespace gradclip::cpu
