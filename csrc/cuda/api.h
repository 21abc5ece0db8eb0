// The boundary between gradclip._core (intake, validation, Python) and
// gradclip._cuda (kernels). _cuda hands _core a pointer to one Api struct in
// a PyCapsule; both modules are built from this tree by the same compiler, and
// abi_version guards against mixing builds. Everything here is plain data: no
// Python, no CUDA types (streams travel as void*).
#pragma once

#include <cstdint>

#include "core/types.h"

namespace gradclip::cuda {

constexpr uint32_t kApiVersion = 1;

// One dense tensor in device memory; group numbers the limit it follows.
struct DeviceTensor {
  void* data;
  int64_t numel;
  DType dtype;
  int32_t group;
};

enum class Job : int32_t {
  kNorms,          // per-tensor, per-group and total norms only
  kClipGlobal,     // each group scaled by min(limit / (group norm + eps), 1)
  kClipPerTensor,  // each tensor by min(limit of its group / (its norm + eps), 1)
  kNormalize,      // each group scaled to norm `limit` (zero norms left alone)
  kScale,          // scale by a coefficient: `coef`, or computed from a norm in device memory
  kClamp,          // clamp every element to [-bound, bound] (bound rounded per dtype)
};

// Where a job's results go: device memory the caller allocated (null: not
// wanted). Norms are float64 when out_f64, else float32.
struct Outputs {
  void* total = nullptr;       // 1 value
  void* per_group = nullptr;   // n_groups values
  void* per_tensor = nullptr;  // one value per tensor, in the order given
  bool out_f64 = false;
  uint8_t* changed_blocks = nullptr;  // kClamp: one flag per block of every launch (changed_flag_count), all written
};

struct Request {
  Job job = Job::kNorms;
  NormOrder order = NormOrder::from_p(2.0);
  double eps = 0.0;
  const double* limits = nullptr;  // host array, one per group (clip and normalize jobs)
  int32_t n_groups = 1;
  // Write nothing when some tensor's norm is NaN or inf, or the total is as
  // stored (error_if_nonfinite: the caller then reads the total, its one host
  // sync, and raises).
  bool hold_nonfinite = false;
  // kScale: the coefficient, or, when norm is set, min(max_norm / (*norm + eps), 1)
  // computed on the device from a norm of dtype norm_dtype.
  double coef = 1.0;
  const void* norm = nullptr;
  DType norm_dtype = DType::kF32;
  double max_norm = 0.0;
  double clamp_limit = 0.0;  // kClamp
  int32_t device = 0;
  void* stream = nullptr;  // cudaStream_t of the caller's framework
  void* workspace = nullptr;
  Outputs out;
};

struct Api {
  uint32_t abi_version;
  // Bytes of device workspace `launch` needs for these tensors and this request.
  int64_t (*workspace_bytes)(const DeviceTensor* tensors, int64_t n, const Request* request);
  // Number of kClamp change flags (bytes of out.changed_blocks).
  int64_t (*changed_flag_count)(const DeviceTensor* tensors, int64_t n);
  // Checks the request, then launches every kernel on request->stream without
  // waiting for them. Returns null, or an error message (valid until the next call).
  const char* (*launch)(const DeviceTensor* tensors, int64_t n, const Request* request);
  // The most groups one request may have.
  int32_t max_groups;
};

}  // namespace gradclip::cuda
