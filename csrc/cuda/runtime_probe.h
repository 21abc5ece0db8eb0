// What the CUDA runtime can see. Calling this initialises the driver, so the
// package calls it only on request (build_info) and never at import: a process
// that later forks must not have touched CUDA.
#pragma once

namespace gradclip::cuda {

struct RuntimeStatus {
  int runtime_version;  // e.g. 13000; of the statically linked runtime
  int driver_version;   // 0 when no driver is installed
  int device_count;     // 0 when there is no driver or no device
  int error_code;       // cudaError_t of cudaGetDeviceCount (0 = success)
  const char* error;    // its name
};

RuntimeStatus probe_runtime();

}  // namespace gradclip::cuda
