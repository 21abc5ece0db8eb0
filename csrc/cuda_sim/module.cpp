// gradclip._cuda_sim: the CUDA backend's kernels and launch code, run on the
// host (simt.h), for the tests. `run` plays the part of the CUDA bridge
// (binding/cuda_bridge.cpp): it builds one Request, provides "device" memory
// (host memory here) for the outputs and the workspace, calls the same
// Api::launch the GPU build exports, and returns what the kernels wrote.
//
// Outputs and workspace start filled with 0xff bytes (NaN in every float
// format) and the clamp flags with 0xaa, so a result the kernels forget to
// write, or a workspace slot read before it is written, shows.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/api.h"
#include "cuda/plan.h"
#include "cuda_sim/plan_coverage.h"
#include "cuda_sim/simt.h"

namespace py = pybind11;

namespace gradclip::cuda {
const Api& api();  // kernels.cu, as compiled in kernels_on_host.cpp
}

namespace {

using gradclip::DType;
using gradclip::NormOrder;
using namespace gradclip::cuda;

// The jobs the tests name, as the engine's stages and clip kind.
struct Job {
  uint32_t stages;
  gradclip::ClipKind kind;
};

Job job_named(const std::string& name) {
  using gradclip::ClipKind;
  constexpr uint32_t kNormStages = kReduce | kFinalize;
  if (name == "norms") return {kNormStages, ClipKind::kNone};
  if (name == "clip_global") return {kNormStages | kApply, ClipKind::kGlobal};
  if (name == "clip_per_tensor") return {kNormStages | kApply, ClipKind::kPerTensor};
  if (name == "normalize") return {kNormStages | kApply, ClipKind::kNormalize};
  if (name == "scale") return {kApply, ClipKind::kGlobal};
  if (name == "clamp") return {kApply, ClipKind::kValue};
  throw py::value_error("job: unknown job '" + name + "'");
}

DType dtype_named(const std::string& name) {
  if (name == "float32") return DType::kF32;
  if (name == "float64") return DType::kF64;
  if (name == "float16") return DType::kF16;
  if (name == "bfloat16") return DType::kBF16;
  throw py::value_error("dtype: unknown dtype '" + name + "'");
}

// 256-byte aligned, as a framework's device allocator returns.
struct Buffer {
  std::unique_ptr<unsigned char[]> raw;
  unsigned char* data = nullptr;
  Buffer(int64_t bytes, unsigned char fill) : raw(new unsigned char[size_t(bytes) + 256]) {
    data = raw.get() + (256 - reinterpret_cast<uintptr_t>(raw.get()) % 256) % 256;
    std::memset(data, fill, size_t(bytes));
  }
};

py::object read_values(const void* at, int64_t count, bool f64) {
  if (!at) return py::none();
  py::list values;
  for (int64_t i = 0; i < count; ++i)
    values.append(f64 ? static_cast<const double*>(at)[i] : double(static_cast<const float*>(at)[i]));
  return values;
}

// The kernel launches made on this thread since the last call: (kernel, grid, block).
py::list launch_log() {
  py::list launches;
  for (const auto& l : gradclip::simt::take_launch_log()) launches.append(py::make_tuple(l.kernel, l.grid, l.block));
  return launches;
}

py::dict run(const std::vector<py::tuple>& tensors, const std::string& job, double p, double eps,
             const std::vector<double>& limits, const std::string& nonfinite, double coef, py::object norm, double max_norm,
             double clamp_limit, bool out_f64, const std::vector<std::string>& outputs) {
  const int64_t n = int64_t(tensors.size());
  std::vector<DeviceTensor> ts(n);
  for (int64_t t = 0; t < n; ++t) {
    const py::tuple& d = tensors[t];  // (address, numel, dtype name, group)
    ts[t] = {reinterpret_cast<void*>(d[0].cast<uintptr_t>()), d[1].cast<int64_t>(),
             dtype_named(d[2].cast<std::string>()), d[3].cast<int32_t>()};
  }
  Request r;
  const Job j = job_named(job);
  r.stages = j.stages;
  r.kind = j.kind;
  r.order = NormOrder::from_p(p);
  r.eps = eps;
  // A scale by a norm and a clamp take their one limit as limits[0].
  std::vector<double> given = limits;
  if (j.kind == gradclip::ClipKind::kValue) given = {clamp_limit};
  else if (j.stages == kApply) given = {max_norm};
  r.limits = given.empty() ? nullptr : given.data();
  r.n_groups = limits.empty() ? 1 : int32_t(limits.size());
  if (nonfinite != "propagate" && nonfinite != "hold")
    throw py::value_error("nonfinite: 'propagate' or 'hold', got '" + nonfinite + "'");
  r.nonfinite = nonfinite == "hold" ? gradclip::Nonfinite::kHold : gradclip::Nonfinite::kPropagate;
  r.total_as_float32 = !out_f64;
  r.coef = coef;
  if (!norm.is_none()) {
    const py::tuple d = norm;  // (address, dtype name)
    r.norm = reinterpret_cast<const void*>(d[0].cast<uintptr_t>());
    r.norm_dtype = dtype_named(d[1].cast<std::string>());
  }

  for (const std::string& o : outputs)
    if (o != "total" && o != "per_group" && o != "per_tensor" && o != "flags")
      throw py::value_error("outputs: 'total', 'per_group', 'per_tensor' or 'flags', got '" + o + "'");
  const Api& api = gradclip::cuda::api();
  auto wants = [&](const char* what) {
    for (const std::string& o : outputs)
      if (o == what) return true;
    return false;
  };
  const int64_t es = out_f64 ? 8 : 4;
  const int64_t flag_count = api.changed_flag_count(ts.data(), n);
  Buffer total(es, 0xff), per_group(es * r.n_groups, 0xff), per_tensor(es * (n ? n : 1), 0xff),
      flags(flag_count ? flag_count : 1, 0xaa);
  r.out.out_f64 = out_f64;
  if (wants("total")) r.out.total = total.data;
  if (wants("per_group")) r.out.per_group = per_group.data;
  if (wants("per_tensor")) r.out.per_tensor = per_tensor.data;
  if (wants("flags")) r.out.changed_blocks = flags.data;
  const int64_t ws_bytes = api.workspace_bytes(ts.data(), n, &r);
  Buffer workspace(ws_bytes ? ws_bytes : 1, 0xff);
  r.workspace = workspace.data;

  gradclip::simt::take_launch_log();
  if (const char* error = api.launch(ts.data(), n, &r)) throw std::runtime_error(error);

  py::dict out;
  out["total"] = py::none();
  if (r.out.total) out["total"] = py::list(read_values(r.out.total, 1, out_f64))[0];
  out["per_group"] = read_values(r.out.per_group, r.n_groups, out_f64);
  out["per_tensor"] = read_values(r.out.per_tensor, n, out_f64);
  py::list flag_values;
  if (r.out.changed_blocks)
    for (int64_t i = 0; i < flag_count; ++i) flag_values.append(int(flags.data[i]));
  out["flags"] = flag_values;
  out["launches"] = launch_log();
  out["workspace_bytes"] = ws_bytes;
  return out;
}

// Kernels with planted defects, which tests/test_cuda_sim.py uses to show the
// simulator's checks are live: a barrier half the block skips, a shuffle half
// a warp skips, 16-byte accesses off the 16-byte grid, a read its barrier does
// not guard (a race), and a read of a shared slot nobody wrote.
__global__ void divergent_barrier_kernel(int) {
  if (threadIdx.x < 128) __syncthreads();
}
__global__ void divergent_shuffle_kernel(int) {
  if (threadIdx.x % 32 < 16) (void)__shfl_down_sync(0xffffffffu, 1.0, 1);
}
__global__ void misaligned_vector_kernel(const unsigned char* p) {
  (void)__ldg(reinterpret_cast<const uint4*>(p + 4));
}
// Reads a neighbour's shared-memory cell with no barrier after its write.
__global__ void shared_race_kernel(double* out) {
  GRADCLIP_SHARED(double, cells, 256);
  cells[threadIdx.x] = -1.0;
  __syncthreads();
  cells[threadIdx.x] = threadIdx.x;
  out[threadIdx.x] = cells[(threadIdx.x + 1) % 256];  // the missing __syncthreads belongs before this read
}

// Block 0 writes every cell; block 1 only the first half, then reads one of
// the other half: what it finds is what an unwritten cell holds.
__global__ void unwritten_shared_kernel(double* out) {
  GRADCLIP_SHARED(double, cells, 256);
  if (blockIdx.x == 0 || threadIdx.x < 128) cells[threadIdx.x] = 1.0;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = cells[200];
}
__global__ void misaligned_store_kernel(unsigned char* p) {
  if (threadIdx.x == 0) gradclip::simt::store_vector(reinterpret_cast<uint4*>(p + 8), uint4{0, 0, 0, 0});
}

// What unwritten_shared_kernel's two blocks read from cell 200.
std::vector<double> unwritten_shared_probe() {
  std::vector<double> out(2);
  GRADCLIP_LAUNCH(unwritten_shared_kernel, 2, 256, nullptr)(out.data());
  gradclip::simt::take_launch_log();
  return out;
}

// What shared_race_kernel reads under the current schedule.
std::vector<double> race_probe() {
  std::vector<double> out(256);
  GRADCLIP_LAUNCH(shared_race_kernel, 1, 256, nullptr)(out.data());
  gradclip::simt::take_launch_log();
  return out;
}

void set_schedule(const std::string& name, uint64_t seed) {
  using gradclip::simt::Schedule;
  if (name == "forward") gradclip::simt::set_schedule(Schedule::kForward, seed);
  else if (name == "reverse") gradclip::simt::set_schedule(Schedule::kReverse, seed);
  else if (name == "shuffled") gradclip::simt::set_schedule(Schedule::kShuffled, seed);
  else if (name == "warp_first") gradclip::simt::set_schedule(Schedule::kWarpFirst, seed);
  else throw py::value_error("schedule: 'forward', 'reverse', 'shuffled' or 'warp_first', got '" + name + "'");
}

std::string probe(const std::string& defect) {
  alignas(16) unsigned char bytes[64] = {};
  if (defect == "divergent_barrier") GRADCLIP_LAUNCH(divergent_barrier_kernel, 2, 256, nullptr)(0);
  else if (defect == "divergent_shuffle") GRADCLIP_LAUNCH(divergent_shuffle_kernel, 1, 64, nullptr)(0);
  else if (defect == "misaligned_vector") GRADCLIP_LAUNCH(misaligned_vector_kernel, 1, 32, nullptr)(bytes);
  else if (defect == "misaligned_store") GRADCLIP_LAUNCH(misaligned_store_kernel, 1, 32, nullptr)(bytes);
  else if (defect == "empty_grid") GRADCLIP_LAUNCH(divergent_barrier_kernel, 0, 256, nullptr)(0);
  else throw py::value_error("defect: unknown '" + defect + "'");
  gradclip::simt::take_launch_log();
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

}  // namespace

PYBIND11_MODULE(_cuda_sim, m) {
  m.doc() = "gradclip's CUDA kernels run on the host, for the tests (no GPU needed).";
  m.def("run", &run, py::arg("tensors"), py::arg("job"), py::arg("p") = 2.0, py::arg("eps") = 1e-6,
        py::arg("limits") = std::vector<double>{}, py::arg("nonfinite") = "propagate", py::arg("coef") = 1.0,
        py::arg("norm") = py::none(), py::arg("max_norm") = 0.0, py::arg("clamp_limit") = 0.0,
        py::arg("out_f64") = false,
        py::arg("outputs") = std::vector<std::string>{"total", "per_group", "per_tensor", "flags"},
        "Runs one job of the CUDA backend on host memory. tensors: (address, numel, dtype name, group) "
        "tuples. Returns the outputs the kernels wrote, the kernel launches made and the workspace size.");
  m.def("set_schedule", &set_schedule, py::arg("schedule"), py::arg("seed") = 0,
        "The order the simulator resumes runnable threads in, from the next launch on: 'forward', 'reverse', "
        "'shuffled' (a permutation from `seed` at every step) or 'warp_first' (warps in reverse order, each "
        "run until it blocks).");
  m.def("_unwritten_shared_probe", &unwritten_shared_probe,
        "What two blocks read from a shared cell: written by block 0, not by block 1.");
  m.def("_race_probe", &race_probe,
        "What a kernel with a planted shared-memory race reads, under the current schedule.");
  m.def("launch_log", &launch_log,
        "The kernel launches made on this thread since the last call, as (kernel, grid, block) tuples.");
  m.def("plan_coverage", &gradclip::cuda_plan::check_coverage, py::arg("numels"), py::arg("elem_bytes"),
        py::arg("misalign"), py::arg("plant") = "",
        "Walks the kernels' plan for tensors of these sizes, element sizes and byte misalignments; returns "
        "every broken rule (empty: each element visited once, each partial slot written once and read back).");
  m.def("_probe", &probe, py::arg("defect"),
        "Launches a kernel with a planted defect and returns the error the simulator reports ('' if none).");
  // The same table gradclip._cuda exports, for gradclip._core._use_cuda_backend.
  m.attr("_api") = py::capsule(const_cast<Api*>(&gradclip::cuda::api()), "gradclip._cuda.api");
  m.attr("chunk") = gradclip::cuda_plan::kChunk;
  m.attr("max_tensors_per_launch") = gradclip::cuda_plan::kMaxTensorsPerLaunch;
}
