// The CUDA backend's ties to Python: gradclip._cuda's kernel table (loaded on
// first use) and device memory from the caller's framework, through the
// allocator the Python package registers (gradclip._device.allocate).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/api.h"
#include "engine/cuda_backend.h"

namespace gradclip::binding {

// gradclip._cuda's table (or the test hook's replacement); raises ValueError
// when this build has no CUDA module.
const cuda::Api& cuda_api();

// Memory for one call, from the registered allocator, called as
// allocate(like, out_bytes, workspace_bytes) -> (out, out_ptr, workspace,
// workspace_ptr, stream) with `like` the call's first device tensor. Keeps
// every buffer it made alive; `out()` is the latest output buffer.
class PyDeviceResources final : public engine::DeviceResources {
 public:
  explicit PyDeviceResources(PyObject* like) : like_(like) {}
  engine::DeviceBuffers allocate(int64_t out_bytes, int64_t workspace_bytes) override;
  void unlocked(const std::function<void()>& work) override;
  pybind11::object out() const { return out_; }

 private:
  PyObject* like_;  // borrowed: the intake keeps it alive
  pybind11::object out_ = pybind11::none();
  pybind11::list kept_;
};

// The allocator every CUDA call uses (gradclip/__init__.py registers
// gradclip._device.allocate).
void set_device_allocator(pybind11::handle allocate);

// Test hook: run CUDA jobs through `api` with memory from `allocate` instead of
// gradclip._cuda and the registered allocator; null restores those.
// tests/test_cuda_sim_api.py passes gradclip._cuda_sim's table, which runs the
// kernels on host memory.
void use_cuda_backend(const cuda::Api* api, pybind11::handle allocate);

}  // namespace gradclip::binding
