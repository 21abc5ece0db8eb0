// Runs a job on CUDA tensors: loads gradclip._cuda on first use, asks the
// caller's framework for device memory and its current stream (through
// gradclip._device), and launches through the module's Api table. Results stay
// on the device: the returned dict holds the output buffer and where each
// result lies in it, and the Python layer makes framework views of them.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "binding/intake.h"
#include "cuda/api.h"

namespace gradclip::binding {

struct CudaJob {
  cuda::Request request;
  std::vector<double> limits;            // one per group
  std::vector<int32_t> group_of_span;    // empty: all in group 0
  bool want_total = false;
  bool want_per_group = false;
  bool want_per_tensor = false;
  bool want_changed = false;             // kClamp's per-block flags
  bool force_f64 = false;                // float64 outputs whatever the dtypes
  const Span* norm = nullptr;            // kScale: the norm in device memory
};

// Adds to `result`: device_out (the buffer, or None), out_f64, total_offset,
// group_offset, tensor_offset (byte offsets, -1 when absent), changed_flags.
void run_on_cuda(const Intake& in, CudaJob& job, pybind11::dict& result);

// Test hook: run CUDA jobs through `api` with memory from `allocate` (the
// signature of gradclip._device.allocate) instead of gradclip._cuda and the
// caller's framework; null restores those. tests/test_cuda_sim_api.py passes
// gradclip._cuda_sim's table, which runs the kernels on host memory.
void use_cuda_backend(const cuda::Api* api, pybind11::handle allocate);

}  // namespace gradclip::binding
