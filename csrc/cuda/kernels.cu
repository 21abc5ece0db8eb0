// The CUDA kernels and the host code that launches them. One call of a job:
//   norm     one launch per table of up to kMaxTensorsPerLaunch tensors (one
//            for any list the size of a real model's): per-segment partial
//            power sums, overflow-safe, in fixed slots (plan.h)
//   finalize one single-block launch: per-tensor, per-group and total norms,
//            folded in a fixed order, and the clip coefficients, on the device
//   rescale  one launch per table: reads the coefficient from device memory and
//            writes nothing for a tensor whose coefficient is exactly 1
// Nothing here waits for the device, allocates, or copies host memory, so a
// job is capturable in a CUDA graph: its metadata travels by value in the
// kernel parameters (32 KB since CUDA 12.1), and the workspace and outputs are
// device memory the caller's framework allocated.
//
// The host compiler also builds this file, with GRADCLIP_HOST_SIM, into
// gradclip._cuda_sim, which runs these kernels on the CPU for the tests
// (csrc/cuda_sim/simt.h defines the CUDA names used here).
#ifdef GRADCLIP_HOST_SIM
#include "cuda_sim/simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define GRADCLIP_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#define GRADCLIP_SHARED(type, name, count) __shared__ type name[count]
#endif

#include <algorithm>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "core/clip_rules.h"
#include "core/norm_rescue.h"
#include "cuda/api.h"
#include "cuda/plan.h"

namespace gradclip::cuda {
namespace {

using namespace cuda_plan;

constexpr int kMaxParamGroups = 256;
constexpr int64_t kAlign = 256;

// ---- launch metadata (by value in the kernel parameters) ----
struct Table {
  int64_t first_block;   // global number of this launch's block 0
  int32_t n;             // tensors in this launch
  int32_t first_tensor;  // global number of its tensor 0
  int64_t flag_base;     // clamp: flags of this launch's blocks start here
  void* ptrs[kMaxTensorsPerLaunch];
  uint64_t tags[kMaxTensorsPerLaunch + 1];  // tags[n]: the end of the last tensor
};

struct NormParams {
  Table table;
  Partial* partials;
  uint64_t* tags_out;  // all tags of the call, for the finalize kernel
  double p;
};

enum class CoefSource : int32_t { kValue, kPerGroup, kPerTensor, kFromNorm };

struct ScaleParams {
  Table table;
  CoefSource source;
  DType norm_dtype;
  double value;          // kValue
  const double* coefs;   // kPerGroup / kPerTensor
  const void* norm;      // kFromNorm: min(max_norm / (*norm + eps), 1)
  double max_norm;
  double eps;
};

struct ClampParams {
  Table table;
  double bound[kNumDTypes];  // the limit rounded to each dtype
  uint8_t* flags;            // one per block: 1 when it changed something
  const uint8_t* held;       // set by the finalize kernel: 1 = write nothing (null: never held)
};

struct FinalizeParams {
  int64_t n;
  int32_t n_groups;
  NormOrder::Kind order;
  ClipKind kind;
  Nonfinite nonfinite;
  int32_t total_as_float32;
  double p;
  double eps;
  const uint64_t* tags;
  const Partial* partials;
  const Partial* combined;  // stacked group partials replacing the local ones (null: the local ones)
  int32_t n_combined;
  Partial* tensor_sums;
  double* coefs;            // what the scale kernel applies: 1 when held
  uint8_t* held;            // what the clamp kernel reads: 1 when held
  Outputs out;
  double limits[kMaxParamGroups];
};

static_assert(sizeof(NormParams) <= 32764 && sizeof(ScaleParams) <= 32764 && sizeof(ClampParams) <= 32764 &&
                  sizeof(FinalizeParams) <= 32764,
              "kernel parameters are limited to 32764 bytes");

// ---- element access ----

__device__ __forceinline__ float to_c(float v) { return v; }
__device__ __forceinline__ double to_c(double v) { return v; }
__device__ __forceinline__ float to_c(f16_t v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_c(bf16_t v) { return __uint_as_float(uint32_t(v.bits) << 16); }

__device__ __forceinline__ float from_c(float c, float) { return c; }
__device__ __forceinline__ double from_c(double c, double) { return c; }
// A NaN keeps its sign and payload (made quiet), as on the CPU (core/types.h);
// CUDA's own conversions return one canonical NaN.
__device__ __forceinline__ f16_t from_c(float c, f16_t) {
  if (c != c) {
    const uint32_t u = __float_as_uint(c);
    return {uint16_t(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu))};
  }
  return {__half_as_ushort(__float2half_rn(c))};
}
__device__ __forceinline__ bf16_t from_c(float c, bf16_t) {
  if (c != c) return {uint16_t((__float_as_uint(c) >> 16) | 0x40u)};
  return {__bfloat16_as_ushort(__float2bfloat16_rn(c))};
}

__device__ __forceinline__ float load_ro(const float* p) { return __ldg(p); }
__device__ __forceinline__ double load_ro(const double* p) { return __ldg(p); }
__device__ __forceinline__ f16_t load_ro(const f16_t* p) { return {__ldg(reinterpret_cast<const unsigned short*>(p))}; }
__device__ __forceinline__ bf16_t load_ro(const bf16_t* p) { return {__ldg(reinterpret_cast<const unsigned short*>(p))}; }

// 16-byte vector accesses; the host simulation checks their alignment.
#ifdef GRADCLIP_HOST_SIM
using gradclip::simt::load_vector;
using gradclip::simt::store_vector;
#else
__device__ __forceinline__ uint4 load_vector(const uint4* p) { return *p; }
__device__ __forceinline__ void store_vector(uint4* p, const uint4& v) { *p = v; }
#endif

template <class T>
union Vec {
  static constexpr int kLanes = kVectorBytes / sizeof(T);
  uint4 raw;
  T lane[kLanes];
};

// ---- deterministic reductions (fixed shuffle trees) ----
template <bool kMax>
__device__ __forceinline__ double fold2(double a, double b) {
  return kMax ? nan_max(a, b) : a + b;
}

template <bool kMax>
__device__ __forceinline__ double warp_fold(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fold2<kMax>(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

// The fold of v over the block, returned to every thread. smem: 33 doubles.
template <bool kMax>
__device__ double block_fold(double v, double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_fold<kMax>(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x >> 5) ? smem[lane] : 0.0;  // 0 is the identity of both (values are >= 0)
    v = warp_fold<kMax>(v);
    if (lane == 0) smem[32] = v;
  }
  __syncthreads();
  return smem[32];
}

__device__ __forceinline__ Partial shfl_down_partial(Partial a, int off) {
  return {__shfl_down_sync(0xffffffffu, a.sum, off), __shfl_down_sync(0xffffffffu, a.base, off)};
}

__device__ Partial warp_combine(Partial a, NormOrder::Kind kind, double p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) a = combine(a, shfl_down_partial(a, off), kind, p);
  return a;
}

// Combined over the block and returned to every thread. smem: 33 Partials.
__device__ Partial block_combine(Partial a, NormOrder::Kind kind, double p, Partial* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_combine(a, kind, p);
  if (lane == 0) smem[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < int(blockDim.x >> 5) ? smem[lane] : Partial{0.0, 1.0};
    a = warp_combine(a, kind, p);
    if (lane == 0) smem[32] = a;
  }
  __syncthreads();
  // No barrier is needed before smem is reused: the next call's first barrier
  // comes after every thread has read smem[32] here, and nobody writes
  // smem[32] before it (as in block_fold).
  return smem[32];
}

// ---- walking a launch's blocks and segments ----
// Calls fn(t, offset, count, dtype, block) for each segment of this block (plan.h).
template <class Fn>
__device__ __forceinline__ void for_each_block_segment(const Table& tb, Fn&& fn) {
  const int64_t block = tb.first_block + blockIdx.x;
  cuda_plan::for_each_segment(tb.tags, tb.n, block, [&](int t, int64_t offset, int64_t count) {
    fn(t, offset, count, tag_dtype(tb.tags[t]), block);
  });
}

// ---- norm ----
template <NormOrder::Kind K>
__device__ __forceinline__ double step(double acc, double a, double p) {
  if constexpr (K == NormOrder::kL1) return acc + a;
  else if constexpr (K == NormOrder::kL2) return acc + a * a;
  else if constexpr (K == NormOrder::kInf) return nan_max(acc, a);
  else return acc + pow(a, p);
}

// The partial power sum of n elements at x, for the whole block.
template <NormOrder::Kind K, class T>
__device__ Partial segment_power(const T* x, int64_t n, double p, double* smem) {
  constexpr int64_t kPer = Vec<T>::kLanes;
  // Only these plain float64 power sums can overflow or underflow: float16,
  // bfloat16 and float32 squares and absolute values lie far inside float64's range.
  constexpr bool kRescue = K == NormOrder::kP || (K == NormOrder::kL2 && sizeof(T) == 8);
  const SegmentSplit sp = split_segment(reinterpret_cast<uint64_t>(x), n, sizeof(T));
  const uint4* vectors = reinterpret_cast<const uint4*>(x + sp.head);
  double acc = 0.0, max_abs = 0.0;
  auto visit = [&](double v) {
    const double a = fabs(v);
    acc = step<K>(acc, a, p);
    if constexpr (kRescue) max_abs = nan_max(max_abs, a);
  };
  walk_segment(
      sp, kPer, threadIdx.x, kThreads, [&](int64_t i) { visit(to_c(load_ro(x + i))); },
      [&](int64_t v) {
        Vec<T> w;
        w.raw = __ldg(vectors + v);
#pragma unroll
        for (int k = 0; k < kPer; ++k) visit(to_c(w.lane[k]));
      });
  const double sum = block_fold<K == NormOrder::kInf>(acc, smem);
  if constexpr (kRescue) {
    const double m = block_fold<true>(max_abs, smem);
    if (partial_needs_rescue(sum, m)) {
      // Rare: redo with every element divided by the rescue's base, as the CPU does.
      const double base = rescue_base(m, K == NormOrder::kP);
      acc = 0.0;
      auto visit_scaled = [&](double v) { acc = step<K>(acc, fabs(v) / base, p); };
      walk_segment(
          sp, kPer, threadIdx.x, kThreads, [&](int64_t i) { visit_scaled(to_c(load_ro(x + i))); },
          [&](int64_t v) {
            Vec<T> w;
            w.raw = __ldg(vectors + v);
            for (int k = 0; k < kPer; ++k) visit_scaled(to_c(w.lane[k]));
          });
      return {block_fold<false>(acc, smem), base};
    }
  }
  return {sum, 1.0};
}

template <NormOrder::Kind K>
__global__ void __launch_bounds__(kThreads) norm_kernel(const __grid_constant__ NormParams prm) {
  GRADCLIP_SHARED(double, smem, 33);
  const Table& tb = prm.table;
  if (blockIdx.x == 0)
    for (int i = threadIdx.x; i <= tb.n; i += kThreads) prm.tags_out[tb.first_tensor + i] = tb.tags[i];
  for_each_block_segment(tb, [&](int t, int64_t offset, int64_t count, int dtype, int64_t block) {
    Partial r;
    switch (DType(dtype)) {
      case DType::kF32: r = segment_power<K>(static_cast<const float*>(tb.ptrs[t]) + offset, count, prm.p, smem); break;
      case DType::kF64: r = segment_power<K>(static_cast<const double*>(tb.ptrs[t]) + offset, count, prm.p, smem); break;
      case DType::kF16: r = segment_power<K>(static_cast<const f16_t*>(tb.ptrs[t]) + offset, count, prm.p, smem); break;
      default: r = segment_power<K>(static_cast<const bf16_t*>(tb.ptrs[t]) + offset, count, prm.p, smem); break;
    }
    if (threadIdx.x == 0) prm.partials[segment_slot(tb.first_tensor + t, block)] = r;
  });
}

// ---- finalize: one block folds the partials, in a fixed order ----
__device__ void store_norm(void* out, int64_t i, double v, bool f64) {
  if (f64) static_cast<double*>(out)[i] = v;
  else static_cast<float*>(out)[i] = float(v);  // round to nearest: just above FLT_MAX stays FLT_MAX
}

// Group g's partial folded over the stack of combined partials, in stack order.
__device__ Partial combined_group(const FinalizeParams& f, int g) {
  Partial acc{0.0, 1.0};
  for (int k = 0; k < f.n_combined; ++k) acc = combine(acc, f.combined[int64_t(k) * f.n_groups + g], f.order, f.p);
  return acc;
}

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const __grid_constant__ FinalizeParams f) {
  GRADCLIP_SHARED(Partial, smem, 33);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kFinalizeThreads / 32;
  // Each tensor's segments: a few by one thread, many by a warp.
  for (int64_t t = tid; t < f.n; t += kFinalizeThreads) {
    const int64_t s = tag_start(f.tags[t]), e = tag_start(f.tags[t + 1]);
    const int64_t b0 = first_block(s), b1 = end_block(s, e);
    if (b1 - b0 > kSerialFoldSegments) continue;
    Partial acc{0.0, 1.0};
    for (int64_t b = b0; b < b1; ++b) acc = combine(acc, f.partials[segment_slot(t, b)], f.order, f.p);
    f.tensor_sums[t] = acc;
  }
  for (int64_t t = warp; t < f.n; t += kWarps) {
    const int64_t s = tag_start(f.tags[t]), e = tag_start(f.tags[t + 1]);
    const int64_t b0 = first_block(s), b1 = end_block(s, e);
    if (b1 - b0 <= kSerialFoldSegments) continue;
    Partial acc{0.0, 1.0};
    for (int64_t b = b0 + lane; b < b1; b += 32) acc = combine(acc, f.partials[segment_slot(t, b)], f.order, f.p);
    acc = warp_combine(acc, f.order, f.p);
    if (lane == 0) f.tensor_sums[t] = acc;
  }
  __syncthreads();

  int bad = 0;
  for (int64_t t = tid; t < f.n; t += kFinalizeThreads) {
    const double norm = partial_norm(f.tensor_sums[t], f.order, f.p);
    bad |= !isfinite(norm);
    if (f.out.per_tensor) store_norm(f.out.per_tensor, t, norm, f.out.out_f64);
  }
  // The total, then each group's norm and coefficient: a strided fold, then a tree.
  Partial all{0.0, 1.0};
  for (int64_t t = tid; t < f.n; t += kFinalizeThreads) all = combine(all, f.tensor_sums[t], f.order, f.p);
  all = block_combine(all, f.order, f.p, smem);
  double total = partial_norm(all, f.order, f.p);
  if (f.combined) {  // every thread folds the stacked partials: each group over the stack, then the groups
    Partial c{0.0, 1.0};
    for (int g = 0; g < f.n_groups; ++g) c = combine(c, combined_group(f, g), f.order, f.p);
    total = partial_norm(c, f.order, f.p);
  }
  const bool nonfinite = __syncthreads_or(saw_nonfinite(bad != 0, total, f.total_as_float32));
  const bool hold = holds(f.nonfinite, nonfinite);
  for (int g = 0; g < f.n_groups; ++g) {
    Partial group = all;
    if (f.n_groups > 1) {
      Partial acc{0.0, 1.0};
      for (int64_t t = tid; t < f.n; t += kFinalizeThreads)
        if (tag_group(f.tags[t]) == g) acc = combine(acc, f.tensor_sums[t], f.order, f.p);
      group = block_combine(acc, f.order, f.p, smem);
    }
    if (tid == 0) {
      double norm = f.n_groups > 1 ? partial_norm(group, f.order, f.p) : total;
      if (f.combined && f.n_groups > 1) norm = partial_norm(combined_group(f, g), f.order, f.p);
      if (f.out.group_partials) f.out.group_partials[g] = group;
      if (f.out.per_group) store_norm(f.out.per_group, g, norm, f.out.out_f64);
      if (per_group_coefficient(f.kind)) {
        const double c = coefficient(f.kind, f.limits[g], norm, f.eps);
        if (f.out.coefs) f.out.coefs[g] = c;
        f.coefs[g] = hold ? 1.0 : c;
      }
    }
  }
  if (tid == 0) {
    if (f.out.total) store_norm(f.out.total, 0, total, f.out.out_f64);
    if (f.out.nonfinite) *f.out.nonfinite = uint8_t(nonfinite);
    if (f.held) *f.held = uint8_t(hold);
  }
  if (f.kind == ClipKind::kPerTensor) {
    for (int64_t t = tid; t < f.n; t += kFinalizeThreads) {
      const double c = coefficient(f.kind, f.limits[tag_group(f.tags[t])], partial_norm(f.tensor_sums[t], f.order, f.p), f.eps);
      if (f.out.coefs) f.out.coefs[t] = c;
      f.coefs[t] = hold ? 1.0 : c;
    }
  }
}

// ---- rescale: x *= coef, in the dtype's compute type, as the CPU does ----
__device__ double load_norm(const void* p, DType t) {
  switch (t) {
    case DType::kF32: return *static_cast<const float*>(p);
    case DType::kF64: return *static_cast<const double*>(p);
    case DType::kF16: return to_c(*static_cast<const f16_t*>(p));
    default: return to_c(*static_cast<const bf16_t*>(p));
  }
}

template <class T>
__device__ void segment_scale(T* x, int64_t n, double coef) {
  using C = ComputeType<T>;
  constexpr int64_t kPer = Vec<T>::kLanes;
  const C c = C(coef);
  const SegmentSplit sp = split_segment(reinterpret_cast<uint64_t>(x), n, sizeof(T));
  uint4* vectors = reinterpret_cast<uint4*>(x + sp.head);
  walk_segment(
      sp, kPer, threadIdx.x, kThreads, [&](int64_t i) { x[i] = from_c(to_c(x[i]) * c, T{}); },
      [&](int64_t v) {
        Vec<T> w;
        w.raw = load_vector(vectors + v);
#pragma unroll
        for (int k = 0; k < kPer; ++k) w.lane[k] = from_c(to_c(w.lane[k]) * c, T{});
        store_vector(vectors + v, w.raw);
      });
}

__global__ void __launch_bounds__(kThreads) scale_kernel(const __grid_constant__ ScaleParams prm) {
  const Table& tb = prm.table;
  double block_coef = prm.value;
  if (prm.source == CoefSource::kFromNorm)
    block_coef = clip_coefficient(prm.max_norm, load_norm(prm.norm, prm.norm_dtype), prm.eps);
  for_each_block_segment(tb, [&](int t, int64_t offset, int64_t count, int dtype, int64_t) {
    double coef = block_coef;
    if (prm.source == CoefSource::kPerGroup) coef = prm.coefs[tag_group(tb.tags[t])];
    else if (prm.source == CoefSource::kPerTensor) coef = prm.coefs[tb.first_tensor + t];
    if (coef == 1.0) return;  // the point of it all: an unclipped tensor costs no write
    switch (DType(dtype)) {
      case DType::kF32: segment_scale(static_cast<float*>(tb.ptrs[t]) + offset, count, coef); break;
      case DType::kF64: segment_scale(static_cast<double*>(tb.ptrs[t]) + offset, count, coef); break;
      case DType::kF16: segment_scale(static_cast<f16_t*>(tb.ptrs[t]) + offset, count, coef); break;
      default: segment_scale(static_cast<bf16_t*>(tb.ptrs[t]) + offset, count, coef); break;
    }
  });
}

// ---- clamp: a vector is stored only when one of its lanes changes ----
template <class T>
__device__ bool segment_clamp(T* x, int64_t n, double bound) {
  using C = ComputeType<T>;
  constexpr int64_t kPer = Vec<T>::kLanes;
  const C hi = C(bound);  // exact: the host rounded the bound to T
  const T hi_t = from_c(hi, T{}), lo_t = from_c(-hi, T{});
  // Unchanged lanes keep their own bits (NaN payloads included).
  auto clamp_one = [&](T& v) -> bool {
    const C c = to_c(v);
    if (c > hi) { v = hi_t; return true; }
    if (c < -hi) { v = lo_t; return true; }
    return false;
  };
  const SegmentSplit sp = split_segment(reinterpret_cast<uint64_t>(x), n, sizeof(T));
  uint4* vectors = reinterpret_cast<uint4*>(x + sp.head);
  bool changed = false;
  walk_segment(
      sp, kPer, threadIdx.x, kThreads,
      [&](int64_t i) {
        T v = x[i];
        if (clamp_one(v)) {
          x[i] = v;
          changed = true;
        }
      },
      [&](int64_t v) {
        Vec<T> w;
        w.raw = load_vector(vectors + v);
        bool any = false;
#pragma unroll
        for (int k = 0; k < kPer; ++k) any |= clamp_one(w.lane[k]);
        if (any) {
          store_vector(vectors + v, w.raw);
          changed = true;
        }
      });
  return changed;
}

__global__ void __launch_bounds__(kThreads) clamp_kernel(const __grid_constant__ ClampParams prm) {
  const Table& tb = prm.table;
  bool changed = false;
  if (prm.held && *prm.held) {  // a nonfinite norm under Nonfinite::kHold: write nothing
    if (prm.flags && threadIdx.x == 0) prm.flags[tb.flag_base + blockIdx.x] = 0;
    return;
  }
  for_each_block_segment(tb, [&](int t, int64_t offset, int64_t count, int dtype, int64_t) {
    const double b = prm.bound[dtype];
    switch (DType(dtype)) {
      case DType::kF32: changed |= segment_clamp(static_cast<float*>(tb.ptrs[t]) + offset, count, b); break;
      case DType::kF64: changed |= segment_clamp(static_cast<double*>(tb.ptrs[t]) + offset, count, b); break;
      case DType::kF16: changed |= segment_clamp(static_cast<f16_t*>(tb.ptrs[t]) + offset, count, b); break;
      default: changed |= segment_clamp(static_cast<bf16_t*>(tb.ptrs[t]) + offset, count, b); break;
    }
  });
  const int any = __syncthreads_or(changed);
  // One flag per block of every launch, numbered without gaps (a block at a
  // table boundary runs in two launches and gets two flags).
  if (prm.flags && threadIdx.x == 0) prm.flags[tb.flag_base + blockIdx.x] = uint8_t(any);
}

// ---- host side ----
// Flat starts of all tensors (plus the end) in one pass.
struct FlatPlan {
  std::vector<uint64_t> tags;  // n + 1
  int64_t elements = 0;
  int64_t launches = 0;  // tables
};

FlatPlan plan_flat(const DeviceTensor* ts, int64_t n) {
  FlatPlan fp;
  fp.tags.resize(n + 1);
  int64_t pos = 0;
  for (int64_t t = 0; t < n; ++t) {
    fp.tags[t] = make_tag(pos, int(ts[t].dtype), ts[t].group);
    pos += ts[t].numel;
  }
  fp.tags[n] = make_tag(pos, 0, 0);
  fp.elements = pos;
  fp.launches = launch_count(n);
  return fp;
}

struct WorkspaceLayout {
  int64_t tags, partials, tensor_sums, coefs, held, bytes;
};

int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Only the norm stages use the workspace; a launch that runs kFinalize alone
// finds there what the kReduce launch before it left.
bool uses_norms(uint32_t stages) { return (stages & (kReduce | kFinalize)) != 0; }

WorkspaceLayout layout_of(int64_t n, int64_t elements, int32_t n_groups, uint32_t stages) {
  WorkspaceLayout w{};
  if (!uses_norms(stages)) return w;
  int64_t at = 0;
  w.tags = at;
  at = align_up(at + (n + 1) * 8);
  w.partials = at;
  at = align_up(at + partial_slots(n, elements) * int64_t(sizeof(Partial)));
  w.tensor_sums = at;
  at = align_up(at + n * int64_t(sizeof(Partial)));
  w.coefs = at;
  at = align_up(at + (n > n_groups ? n : n_groups) * 8);
  w.held = at;
  at = align_up(at + 1);
  w.bytes = at;
  return w;
}

int64_t workspace_bytes(const DeviceTensor* ts, int64_t n, const Request* r) {
  int64_t elements = 0;
  for (int64_t t = 0; t < n; ++t) elements += ts[t].numel;
  return layout_of(n, elements, r->n_groups, r->stages).bytes;
}

int64_t changed_flag_count(const DeviceTensor* ts, int64_t n) {
  const FlatPlan fp = plan_flat(ts, n);
  int64_t flags = 0;
  for (int64_t j = 0; j < fp.launches; ++j) flags += launch_slice(fp.tags.data(), n, j).blocks;
  return flags;
}

// Fills table j of the call and returns its grid size.
unsigned fill_table(Table& tb, const DeviceTensor* ts, const FlatPlan& fp, int64_t j) {
  const int64_t n = int64_t(fp.tags.size()) - 1;
  const LaunchSlice sl = launch_slice(fp.tags.data(), n, j);
  tb.n = int32_t(sl.count);
  tb.first_tensor = int32_t(sl.first_tensor);
  tb.first_block = sl.first_block;
  tb.flag_base = 0;
  for (int64_t i = 0; i < j; ++i) tb.flag_base += launch_slice(fp.tags.data(), n, i).blocks;
  for (int64_t i = 0; i < sl.count; ++i) tb.ptrs[i] = ts[sl.first_tensor + i].data;
  std::memcpy(tb.tags, &fp.tags[sl.first_tensor], (sl.count + 1) * sizeof(uint64_t));
  return unsigned(sl.blocks);
}

std::string& last_error() {
  static thread_local std::string e;
  return e;
}

const char* fail(const std::string& why) {
  last_error() = why;
  return last_error().c_str();
}

// Selects the tensors' device when it is not the current one, and restores the
// caller's on every way out (only then: setting a device creates its context).
struct DeviceGuard {
  int previous = -1;
  bool switched = false;
  cudaError_t status = cudaSuccess;
  explicit DeviceGuard(int device) {
    status = cudaGetDevice(&previous);
    if (status == cudaSuccess && previous != device) {
      status = cudaSetDevice(device);
      switched = status == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (switched) cudaSetDevice(previous);
  }
};

// The error of the launch just made, if any. Checked after every launch, so
// that no kernel runs on the results of one that failed to launch (a finalize
// on an unwritten workspace, a rescale with stale coefficients).
const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return nullptr;
  return fail(std::string("CUDA kernel launch failed: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

template <NormOrder::Kind K>
void launch_norm(const NormParams& prm, unsigned grid, cudaStream_t stream) {
  GRADCLIP_LAUNCH(norm_kernel<K>, grid, kThreads, stream)(prm);
}

const char* launch(const DeviceTensor* ts, int64_t n, const Request* r) {
  const FlatPlan fp = plan_flat(ts, n);
  if (fp.elements > kMaxFlatElements) return fail("too many elements for one call (at most 2^48)");
  if (r->n_groups < 1 || r->n_groups > kMaxParamGroups)
    return fail("at most " + std::to_string(kMaxParamGroups) + " groups per call on CUDA, got " +
                std::to_string(r->n_groups));
  for (int64_t t = 0; t < n; ++t)
    if (ts[t].group < 0 || ts[t].group >= r->n_groups) return fail("a tensor's group has no limit");
  if (n > INT32_MAX - kMaxTensorsPerLaunch) return fail("too many tensors");
  if (r->nonfinite == Nonfinite::kZero) return fail("the nonfinite policy 'zero' is not available on CUDA");
  const bool clamps = r->kind == ClipKind::kValue;
  if ((r->stages & kApply) && (clamps || (r->norm && !(r->stages & kFinalize))) && !r->limits)
    return fail("a clamp, or a scale by a norm, needs its limit");

  DeviceGuard guard(r->device);
  if (guard.status != cudaSuccess) return fail(std::string("cannot select the device: ") + cudaGetErrorString(guard.status));
  cudaStream_t stream = static_cast<cudaStream_t>(r->stream);
  uint64_t* tags = nullptr;
  Partial *partials = nullptr, *tensor_sums = nullptr;
  double* coefs = nullptr;
  uint8_t* held = nullptr;
  if (uses_norms(r->stages)) {
    char* ws = static_cast<char*>(r->workspace);
    const WorkspaceLayout wl = layout_of(n, fp.elements, r->n_groups, r->stages);
    tags = reinterpret_cast<uint64_t*>(ws + wl.tags);
    partials = reinterpret_cast<Partial*>(ws + wl.partials);
    tensor_sums = reinterpret_cast<Partial*>(ws + wl.tensor_sums);
    coefs = reinterpret_cast<double*>(ws + wl.coefs);
    held = reinterpret_cast<uint8_t*>(ws + wl.held);
  }

  // Kernel parameter blocks are large; keep them off the stack.
  thread_local std::vector<char> storage(sizeof(NormParams) > sizeof(ScaleParams) ? sizeof(NormParams) : sizeof(ScaleParams));
  if (storage.size() < sizeof(ClampParams)) storage.resize(sizeof(ClampParams));

  if (r->stages & kReduce) {
    auto* prm = new (storage.data()) NormParams;
    prm->partials = partials;
    prm->tags_out = tags;
    prm->p = r->order.p;
    for (int64_t j = 0; j < fp.launches; ++j) {
      const unsigned grid = fill_table(prm->table, ts, fp, j);
      switch (r->order.kind) {
        case NormOrder::kL1: launch_norm<NormOrder::kL1>(*prm, grid, stream); break;
        case NormOrder::kL2: launch_norm<NormOrder::kL2>(*prm, grid, stream); break;
        case NormOrder::kInf: launch_norm<NormOrder::kInf>(*prm, grid, stream); break;
        default: launch_norm<NormOrder::kP>(*prm, grid, stream); break;
      }
      if (const char* e = launch_error()) return e;
    }
  }

  if (r->stages & kFinalize) {
    FinalizeParams f{};
    f.n = n;
    f.n_groups = r->n_groups;
    f.order = r->order.kind;
    f.kind = r->kind;
    f.nonfinite = r->nonfinite;
    f.total_as_float32 = r->total_as_float32;
    f.p = r->order.p;
    f.eps = r->eps;
    f.tags = tags;
    f.partials = partials;
    f.combined = r->combined;
    f.n_combined = r->n_combined;
    f.tensor_sums = tensor_sums;
    f.coefs = coefs;
    f.held = held;
    f.out = r->out;
    if (r->kind != ClipKind::kNone)
      for (int g = 0; g < r->n_groups; ++g) f.limits[g] = r->limits[g];
    GRADCLIP_LAUNCH(finalize_kernel, 1, kFinalizeThreads, stream)(f);
    if (const char* e = launch_error()) return e;
  }

  if ((r->stages & kApply) && clamps) {
    auto* prm = new (storage.data()) ClampParams;
    for (int d = 0; d < kNumDTypes; ++d) prm->bound[d] = round_to_dtype(r->limits[0], DType(d));
    prm->flags = r->out.changed_blocks;
    prm->held = (r->stages & kFinalize) ? held : nullptr;
    for (int64_t j = 0; j < fp.launches; ++j) {
      const unsigned grid = fill_table(prm->table, ts, fp, j);
      GRADCLIP_LAUNCH(clamp_kernel, grid, kThreads, stream)(*prm);
      if (const char* e = launch_error()) return e;
    }
  } else if ((r->stages & kApply) && r->kind != ClipKind::kNone) {
    auto* prm = new (storage.data()) ScaleParams;
    prm->coefs = coefs;
    prm->value = r->coef;
    prm->norm = r->norm;
    prm->norm_dtype = r->norm_dtype;
    prm->max_norm = r->norm ? r->limits[0] : 0.0;
    prm->eps = r->eps;
    if (r->stages & kFinalize) prm->source = r->kind == ClipKind::kPerTensor ? CoefSource::kPerTensor : CoefSource::kPerGroup;
    else prm->source = r->norm ? CoefSource::kFromNorm : CoefSource::kValue;
    if (!(prm->source == CoefSource::kValue && r->coef == 1.0))  // a known coefficient of 1: nothing to launch
      for (int64_t j = 0; j < fp.launches; ++j) {
        const unsigned grid = fill_table(prm->table, ts, fp, j);
        GRADCLIP_LAUNCH(scale_kernel, grid, kThreads, stream)(*prm);
        if (const char* e = launch_error()) return e;
      }
  }
  return nullptr;
}

const char* copy_to_host(void* host, const void* device_memory, int64_t bytes, int32_t device, void* stream) {
  DeviceGuard guard(device);
  if (guard.status != cudaSuccess) return fail(std::string("cannot select the device: ") + cudaGetErrorString(guard.status));
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemcpyAsync(host, device_memory, size_t(bytes), cudaMemcpyDeviceToHost, s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  if (err != cudaSuccess) return fail(std::string("copying results to the host failed: ") + cudaGetErrorString(err));
  return nullptr;
}

}  // namespace

const Api& api() {
  static const Api table{kApiVersion, &workspace_bytes, &changed_flag_count, &launch, &copy_to_host, kMaxParamGroups};
  return table;
}

}  // namespace gradclip::cuda
