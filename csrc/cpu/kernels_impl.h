// Kernel bodies written once and compiled once per instruction set.
//
// Included by each isa_*.cpp inside its own namespace, after that file has
// defined its vector policy:
//   F64v  16 float64 lanes    F32v  16 float32 lanes
//   load_f64(const T*)  for T in float, double, f16_t, bf16_t (16 elements, widened)
//   add, mul, abs_v, max_v, zero_f64, unordered_or, store_lanes   (on F64v)
//   load_c / store_c:   16 elements as their compute type (F32v, or F64v for double)
//   mul_c(V, s), clamp_c(V, lo, hi), outside_c(V, lo, hi)   (float32 / float64 clamp)
//   B16v  kLanes16 raw 16-bit patterns    M16  a per-lane mask of them
//   load_b16, store_b16, splat_b16, key_b16 (order key, cpu/bits16.h),
//   ordered_b16(V, inf) (not NaN), lt_b16(ok, a, b) (a < b as int16, only where ok),
//   any_b16(M16, M16), select_b16(V, M16, with)
// Everything here has internal linkage (the includer wraps it in an anonymous
// namespace): an inline function compiled with AVX-512 flags must never be merged
// with, and then called in place of, the baseline copy.

static inline double to_double(float v) { return v; }
static inline double to_double(double v) { return v; }
static inline double to_double(f16_t v) { return f16_to_float(v.bits); }
static inline double to_double(bf16_t v) { return bf16_to_float(v.bits); }

static inline float to_compute(float v) { return v; }
static inline double to_compute(double v) { return v; }
static inline float to_compute(f16_t v) { return f16_to_float(v.bits); }
static inline float to_compute(bf16_t v) { return bf16_to_float(v.bits); }

static inline void from_compute(float v, float* out) { *out = v; }
static inline void from_compute(double v, double* out) { *out = v; }
static inline void from_compute(float v, f16_t* out) { out->bits = float_to_f16(v); }
static inline void from_compute(float v, bf16_t* out) { out->bits = float_to_bf16(v); }

// Software prefetch this many bytes ahead of every streaming loop. Each loop
// iteration carries a float64 add chain, so the out-of-order window holds only
// a few cache lines' worth of loads, and 16-bit data (half a line per
// iteration) left most of a core's DRAM bandwidth unused (the measurements:
// bench/README.md, "Design measurements"). A prefetch never faults, but one past the
// end of the tensor fetches memory nobody asked for: in a list of small
// tensors that is another tensor's (or no tensor's) memory, half as much again
// for a 4 KiB tensor. So prefetches stop at the tensor's end (`extent`
// elements from the block's start), and run on past the block's end when the
// tensor goes on (the next chunk), where stopping would stall every chunk's start.
// One prefetch per cache line of an iteration's 16 elements (float64: two).
// (kPrefetchBytes: isa_kernels.h.)
template <class T>
static inline void prefetch_ahead(const T* p) {
  const char* ahead = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  for (int line = 0; line < int(kLanes * sizeof(T)); line += 64) __builtin_prefetch(ahead + line);
}
// Runs body(i) for i = 0, kStep, 2 kStep, ... while i + kStep <= n, and
// returns where it stopped. Iterations whose prefetch would land inside the
// tensor (`extent` elements from x) prefetch; the last ones do not.
template <class T, int kStep, class Body>
static inline int64_t stream_blocks(const T* x, int64_t n, int64_t extent, Body&& body) {
  const int64_t limit = extent - kPrefetchBytes / int64_t(sizeof(T));
  const int64_t m = limit < n ? limit : n;
  int64_t i = 0;
  for (; i + kStep <= m; i += kStep) {
    prefetch_ahead(x + i);
    body(i);
  }
  for (; i + kStep <= n; i += kStep) body(i);
  return i;
}

// ---- reductions (see the lane contract in isa_kernels.h) ----

struct SquareOp {
  static F64v step(F64v acc, F64v v) { return add(acc, mul(v, v)); }
  static double scalar(double acc, double v) { return acc + v * v; }
};
struct AbsOp {
  static F64v step(F64v acc, F64v v) { return add(acc, abs_v(v)); }
  static double scalar(double acc, double v) { return acc + (v < 0 ? -v : v); }
};

template <class T, class Op>
static double reduce_sum(const void* data, int64_t n, int64_t extent) {
  const T* x = static_cast<const T*>(data);
  F64v acc = zero_f64();
  int64_t i = stream_blocks<T, kLanes>(x, n, extent, [&](int64_t j) { acc = Op::step(acc, load_f64(x + j)); });
  alignas(64) double lanes[kLanes];
  store_lanes(lanes, acc);
  for (int k = 0; i < n; ++i, ++k) lanes[k] = Op::scalar(lanes[k], to_double(x[i]));
  return fold_sum(lanes);
}

template <class T>
static double reduce_max_abs(const void* data, int64_t n, int64_t extent) {
  const T* x = static_cast<const T*>(data);
  F64v acc = zero_f64();
  F64v nan_seen = zero_f64();  // all-ones lanes where a NaN was loaded
  int64_t i = stream_blocks<T, kLanes>(x, n, extent, [&](int64_t j) {
    const F64v v = load_f64(x + j);
    acc = max_v(acc, abs_v(v));
    nan_seen = unordered_or(nan_seen, v);
  });
  alignas(64) double lanes[kLanes];
  alignas(64) double nans[kLanes];
  store_lanes(lanes, acc);
  store_lanes(nans, nan_seen);
  double result = 0.0;
  bool any_nan = false;
  for (int k = 0; k < kLanes; ++k) {
    uint64_t bits;
    std::memcpy(&bits, &nans[k], 8);
    any_nan |= bits != 0;
    result = nan_max(result, lanes[k]);
  }
  for (; i < n; ++i) {
    const double v = to_double(x[i]);
    result = nan_max(result, v < 0 ? -v : v);
  }
  return any_nan ? __builtin_nan("") : result;
}

// ---- elementwise in-place updates ----

template <class T>
static void scale_block(void* data, int64_t n, int64_t extent, double coef) {
  using C = ComputeType<T>;
  T* x = static_cast<T*>(data);
  const C c = static_cast<C>(coef);
  int64_t i = stream_blocks<T, kLanes>(x, n, extent, [&](int64_t j) { store_c(x + j, mul_c(load_c(x + j), c)); });
  for (; i < n; ++i) from_compute(static_cast<C>(to_compute(x[i]) * c), x + i);
}

// Clamp bounds must already be representable in T (the caller rounds them), so
// a clamped element is written back exactly. A block is stored only when one of
// its elements changes: clipping nothing costs one read pass.

// float32 / float64: compared in the compute type, 16 elements a block.
template <class T>
static bool clamp_block(void* data, int64_t n, int64_t extent, double lo_d, double hi_d) {
  using C = ComputeType<T>;
  T* x = static_cast<T*>(data);
  const C lo = static_cast<C>(lo_d), hi = static_cast<C>(hi_d);
  bool changed = false;
  int64_t i = stream_blocks<T, kLanes>(x, n, extent, [&](int64_t j) {
    const auto v = load_c(x + j);
    if (outside_c(v, lo, hi)) {
      store_c(x + j, clamp_c(v, lo, hi));
      changed = true;
    }
  });
  for (; i < n; ++i) {
    const C v = to_compute(x[i]);
    if (v < lo) { from_compute(lo, x + i); changed = true; }
    else if (v > hi) { from_compute(hi, x + i); changed = true; }
  }
  return changed;
}

// float16 / bfloat16: compared as order keys of the raw patterns, kLanes16 a
// block, and a clamped lane takes the bound's pattern (see cpu/bits16.h).
template <class T>
static bool clamp_bits16(void* data, int64_t n, int64_t extent, double lo_d, double hi_d) {
  uint16_t* x = static_cast<uint16_t*>(data);
  const Bits16Clamp c = bits16_clamp<T>(lo_d, hi_d);
  const B16v lo = splat_b16(c.lo), hi = splat_b16(c.hi), inf = splat_b16(c.inf);
  const B16v lo_key = splat_b16(uint16_t(c.lo_key)), hi_key = splat_b16(uint16_t(c.hi_key));
  bool changed = false;
  int64_t i = stream_blocks<uint16_t, kLanes16>(x, n, extent, [&](int64_t j) {
    const B16v v = load_b16(x + j);
    const B16v key = key_b16(v);
    const M16 ok = ordered_b16(v, inf);
    const M16 below = lt_b16(ok, key, lo_key), above = lt_b16(ok, hi_key, key);
    if (any_b16(below, above)) {
      // `below` last, as in clamp_one16().
      store_b16(x + j, select_b16(select_b16(v, above, hi), below, lo));
      changed = true;
    }
  });
  for (; i < n; ++i) changed |= clamp_one16(x + i, c);
  return changed;
}

template <class T>
static constexpr int dtype_index() {
  if constexpr (sizeof(T) == 8) return int(DType::kF64);
  else if constexpr (sizeof(T) == 4) return int(DType::kF32);
  else if constexpr (std::is_same_v<T, f16_t>) return int(DType::kF16);
  else return int(DType::kBF16);
}

template <class T>
static constexpr void fill_entry(IsaKernels& k) {
  constexpr int d = dtype_index<T>();
  k.sum_squares[d] = &reduce_sum<T, SquareOp>;
  k.sum_abs[d] = &reduce_sum<T, AbsOp>;
  k.max_abs[d] = &reduce_max_abs<T>;
  k.scale[d] = &scale_block<T>;
  if constexpr (sizeof(T) == 2) k.clamp[d] = &clamp_bits16<T>;
  else k.clamp[d] = &clamp_block<T>;
}

// constexpr: the table is built at compile time, so no code compiled with this
// file's ISA flags runs before the CPU check.
static constexpr IsaKernels make_table(const char* name) {
  IsaKernels k{};
  k.name = name;
  fill_entry<float>(k);
  fill_entry<double>(k);
  fill_entry<f16_t>(k);
  fill_entry<bf16_t>(k);
  return k;
}
