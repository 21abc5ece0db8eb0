// The boundary between gradclip._core (the engine's CUDA backend,
// engine/cuda_backend.cpp) and gradclip._cuda (kernels). _cuda hands _core a
// pointer to one Api struct in a PyCapsule; both modules are built from this
// tree by the same compiler, and abi_version guards against mixing builds.
// Everything here is plain data: no Python, no CUDA types (streams travel as void*).
#pragma once

#include <cstdint>

#include "core/clip_rules.h"
#include "core/partial.h"
#include "core/types.h"

namespace gradclip::cuda {

constexpr uint32_t kApiVersion = 2;

// One dense tensor in device memory; group numbers the limit it follows.
struct DeviceTensor {
  void* data;
  int64_t numel;
  DType dtype;
  int32_t group;
};

// The engine's stages (engine/engine.h) a launch runs, in this order.
enum Stage : uint32_t {
  kReduce = 1,    // norm kernels: per-block partial power sums into the workspace
  kFinalize = 2,  // one block: norms, the nonfinite decision, coefficients (core/clip_rules.h)
  kApply = 4,     // scale by the coefficients, or clamp (ClipKind::kValue)
};

// Where results go: device memory the caller allocated (null: not wanted).
// Norms are float64 when out_f64, else float32.
struct Outputs {
  void* total = nullptr;       // 1 value
  void* per_group = nullptr;   // n_groups values
  void* per_tensor = nullptr;  // one value per tensor, in the order given
  bool out_f64 = false;
  // kFinalize: the factor each group (kGlobal, kNormalize) or tensor
  // (kPerTensor) is, or when held would be, scaled by; float64.
  double* coefs = nullptr;
  Partial* group_partials = nullptr;  // kFinalize: each group's partial power sum (the engine's seam)
  uint8_t* nonfinite = nullptr;       // kFinalize: 1 when some norm is NaN or inf as reported, else 0
  uint8_t* changed_blocks = nullptr;  // kValue: one flag per block of every launch (changed_flag_count), all written
};

struct Request {
  uint32_t stages = kReduce | kFinalize;
  ClipKind kind = ClipKind::kNone;
  NormOrder order = NormOrder::from_p(2.0);
  double eps = 0.0;
  const double* limits = nullptr;  // host array, one per group (kind != kNone)
  int32_t n_groups = 1;
  // kHold: write nothing when some tensor's norm is NaN or inf, or the total
  // is as reported (the caller then raises or skips). kZero is CPU-only.
  Nonfinite nonfinite = Nonfinite::kPropagate;
  bool total_as_float32 = true;  // the total is reported as float32 (finite_as_reported)
  // kFinalize: the group partials of every participant of a combine (other
  // devices' or processes', this one's among them), n_combined stacked arrays
  // of n_groups, folded in stack order to replace the ones reduced here
  // (device memory), or null.
  const Partial* combined = nullptr;
  int32_t n_combined = 0;
  // kApply without kFinalize (kGlobal): scale by `coef`, or, when norm is set,
  // by clip_coefficient(limits[0], *norm, eps) computed on the device from a
  // norm of dtype norm_dtype.
  double coef = 1.0;
  const void* norm = nullptr;
  DType norm_dtype = DType::kF32;
  int32_t device = 0;
  void* stream = nullptr;  // cudaStream_t of the caller's framework
  // Kept from the launch that ran kReduce to the one that runs kFinalize: the
  // partials live there.
  void* workspace = nullptr;
  Outputs out;
};

struct Api {
  uint32_t abi_version;
  // Bytes of device workspace `launch` needs for these tensors and this request.
  int64_t (*workspace_bytes)(const DeviceTensor* tensors, int64_t n, const Request* request);
  // Number of kValue change flags (bytes of out.changed_blocks).
  int64_t (*changed_flag_count)(const DeviceTensor* tensors, int64_t n);
  // Checks the request, then launches every kernel on request->stream without
  // waiting for them. Returns null, or an error message (valid until the next call).
  const char* (*launch)(const DeviceTensor* tensors, int64_t n, const Request* request);
  // Copies device memory to host memory once the stream's work is done (waits for it).
  const char* (*copy_to_host)(void* host, const void* device_memory, int64_t bytes, int32_t device, void* stream);
  // The most groups one request may have.
  int32_t max_groups;
};

}  // namespace gradclip::cuda
