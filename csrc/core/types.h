// Plain data types shared by the kernels, the CPU operations and the binding layer.
// Nothing here knows about Python, NumPy or torch.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace gradclip {

// Floating dtypes the kernels handle. The values index per-dtype function tables.
enum class DType : uint8_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
constexpr int kNumDTypes = 4;

inline int element_size(DType t) {
  return (t == DType::kF64) ? 8 : (t == DType::kF32) ? 4 : 2;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF64: return "float64";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
  }
  return "?";
}

// A dense run of `numel` elements: a tensor whose memory is non-overlapping and
// dense (any stride order) is processed as this flat view.
struct Span {
  void* data;
  int64_t numel;
  DType dtype;
};

// Spans assigned to groups, e.g. an optimizer's param groups: group_of_span[s]
// is in [0, n_groups). Empty (the default): no per-group norms.
struct Grouping {
  std::vector<int32_t> group_of_span;
  int32_t n_groups = 0;
};

// Which p-norm. L1, L2 and inf have SIMD kernels; any other p > 0 takes the
// generic (pow-based) path.
struct NormOrder {
  enum Kind : uint8_t { kL1, kL2, kInf, kP };
  Kind kind;
  double p;

  static NormOrder from_p(double p) {
    if (p == 1.0) return {kL1, 1.0};
    if (p == 2.0) return {kL2, 2.0};
    if (p > 1e308) return {kInf, p};
    return {kP, p};
  }
};

// 16-bit float storage types, kept as bit patterns.
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// The type arithmetic on a dtype's elements is done in, on every backend:
// float32 for float32 and the 16-bit types, float64 for float64.
template <class T> struct ComputeTypeOf { using type = float; };
template <> struct ComputeTypeOf<double> { using type = double; };
template <class T> using ComputeType = typename ComputeTypeOf<T>::type;

// Portable conversions used by scalar code (tails, the generic-p path, the
// baseline ISA). `static` keeps each translation unit's copy private, so a copy
// compiled with AVX-512 flags can never be picked for the baseline build.
static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
static inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

static inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_to_float(sign);
  // Subnormal half: value = man * 2^-24, exact in float.
  float v = float(man) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

// Round to nearest even, with overflow to inf and gradual underflow.
static inline uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {  // normal half
    uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);
    return uint16_t(sign | (r >> 13));
  }
  // Subnormal or zero half: scale so that one half-ulp (2^-24) becomes 1.0; the
  // float add rounds to nearest even for us.
  const float scaled = bits_to_float(a) * 16777216.0f;  // exact: power of two
  const float rounded = scaled + 8388608.0f - 8388608.0f;  // 2^23 trick, RNE
  return uint16_t(sign | uint16_t(rounded));
}

static inline double load_as_double(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF64: return static_cast<const double*>(p)[i];
    case DType::kF16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0;
}

// A bound as it is stored in dtype t (round to nearest even), as torch does
// when it converts a clamp scalar to the tensor's dtype.
static inline double round_to_dtype(double v, DType t) {
  switch (t) {
    case DType::kF64: return v;
    case DType::kF32: return static_cast<float>(v);
    case DType::kF16: return f16_to_float(float_to_f16(static_cast<float>(v)));
    case DType::kBF16: return bf16_to_float(float_to_bf16(static_cast<float>(v)));
  }
  return v;
}

}  // namespace gradclip
