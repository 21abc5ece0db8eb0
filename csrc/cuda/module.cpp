// gradclip._cuda: the CUDA backend module, loaded lazily by the Python package
// (importing it never initialises CUDA). It is a separate extension so the CPU
// package works on machines with no GPU, no driver and no CUDA libraries.
// gradclip._core reaches the kernels through the Api table in `_api`.
#include <pybind11/pybind11.h>

#include "cuda/api.h"
#include "cuda/runtime_probe.h"

namespace py = pybind11;

namespace gradclip::cuda {
const Api& api();  // kernels.cu
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "gradclip's CUDA module (static CUDA runtime).";
  m.def("runtime_status", [] {
    const gradclip::cuda::RuntimeStatus s = gradclip::cuda::probe_runtime();
    py::dict d;
    d["runtime_version"] = s.runtime_version;
    d["driver_version"] = s.driver_version;
    d["device_count"] = s.device_count;
    d["error_code"] = s.error_code;
    d["error"] = s.error;
    return d;
  });
  // What the build compiled for (CMake's list, e.g. "90-real" or "75-virtual"): a GPU
  // outside it runs only where PTX was compiled in, after the driver compiles it.
  m.attr("architectures") = GRADCLIP_CUDA_ARCHITECTURES_TEXT;
  m.attr("_api") = py::capsule(const_cast<gradclip::cuda::Api*>(&gradclip::cuda::api()), "gradclip._cuda.api");
}
