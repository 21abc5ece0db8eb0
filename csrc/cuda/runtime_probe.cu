#include <cuda_runtime.h>

#include "cuda/runtime_probe.h"

namespace gradclip::cuda {

RuntimeStatus probe_runtime() {
  RuntimeStatus s{};
  cudaRuntimeGetVersion(&s.runtime_version);
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  const cudaError_t err = cudaGetDeviceCount(&s.device_count);
  s.error_code = static_cast<int>(err);
  s.error = cudaGetErrorName(err);
  // cudaErrorInsufficientDriver (35) and cudaErrorNoDevice (100) both mean "no usable GPU".
  if (err != cudaSuccess) {
    s.device_count = 0;
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  }
  return s;
}

}  // namespace gradclip::cuda
