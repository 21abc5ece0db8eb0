#include "binding/cuda_bridge.h"

#include <string>

namespace py = pybind11;

namespace gradclip::binding {
namespace {

// The test hook's replacement backend (use_cuda_backend), or null.
const cuda::Api* g_api_override = nullptr;
PyObject* g_allocate_override = nullptr;  // owned reference

const cuda::Api& cuda_api() {
  if (g_api_override) return *g_api_override;
  static const cuda::Api* api = [] {
    py::object module;
    try {
      module = py::module_::import("gradclip._cuda");
    } catch (py::error_already_set&) {
      throw py::value_error(
          "these tensors are on a CUDA device, but this gradclip build has no CUDA module (it was built "
          "without nvcc, or with GRADCLIP_CUDA=OFF); reinstall gradclip where the CUDA toolkit is present");
    }
    const py::capsule cap = module.attr("_api");
    auto* table = static_cast<const cuda::Api*>(cap.get_pointer());
    if (!table || table->abi_version != cuda::kApiVersion)
      throw py::value_error("gradclip._core and gradclip._cuda come from different builds; reinstall gradclip");
    return table;
  }();
  return *api;
}

int64_t align8(int64_t v) { return (v + 7) / 8 * 8; }

}  // namespace

void use_cuda_backend(const cuda::Api* api, py::handle allocate) {
  if (api && api->abi_version != cuda::kApiVersion)
    throw py::value_error("api: the table comes from a different build of gradclip");
  Py_XDECREF(g_allocate_override);
  g_allocate_override = api ? py::reinterpret_borrow<py::object>(allocate).release().ptr() : nullptr;
  g_api_override = api;
}

void run_on_cuda(const Intake& in, CudaJob& job, py::dict& result) {
  const cuda::Api& api = cuda_api();
  const int64_t n = static_cast<int64_t>(in.spans.size());
  cuda::Request& req = job.request;

  std::vector<cuda::DeviceTensor> tensors(n);
  for (int64_t s = 0; s < n; ++s) {
    const Span& sp = in.spans[s];
    tensors[s] = {sp.data, sp.numel, sp.dtype, job.group_of_span.empty() ? 0 : job.group_of_span[s]};
  }
  req.n_groups = job.limits.empty() ? 1 : static_cast<int32_t>(job.limits.size());
  req.limits = job.limits.empty() ? nullptr : job.limits.data();
  if (req.n_groups > api.max_groups)
    throw py::value_error("at most " + std::to_string(api.max_groups) + " groups per call on CUDA, got " +
                          std::to_string(req.n_groups));
  if (job.norm) {
    req.norm = job.norm->data;
    req.norm_dtype = job.norm->dtype;
  }

  // Outputs, laid out as [total][per group][per tensor], 8-byte aligned.
  const bool f64 = job.force_f64 || in.has_f64();
  const int64_t es = f64 ? 8 : 4;
  int64_t at = 0, total_offset = -1, group_offset = -1, tensor_offset = -1, flags_offset = -1;
  if (job.want_total) { total_offset = at; at = align8(at + es); }
  if (job.want_per_group) { group_offset = at; at = align8(at + es * req.n_groups); }
  if (job.want_per_tensor) { tensor_offset = at; at = align8(at + es * n); }
  int64_t flag_count = 0;
  if (job.want_changed) {
    flag_count = api.changed_flag_count(tensors.data(), n);
    flags_offset = at;
    at = align8(at + flag_count);
  }
  const int64_t ws_bytes = api.workspace_bytes(tensors.data(), n, &req);

  static PyObject* framework_allocate =
      py::object(py::module_::import("gradclip._device").attr("allocate")).release().ptr();
  PyObject* allocate = g_allocate_override ? g_allocate_override : framework_allocate;
  const py::tuple got = py::reinterpret_steal<py::object>(
      PyObject_CallFunction(allocate, "OLL", in.device_example, static_cast<long long>(at),
                            static_cast<long long>(ws_bytes)));
  if (!got) throw py::error_already_set();
  // (out, out_ptr, workspace, workspace_ptr, stream)
  char* out_ptr = reinterpret_cast<char*>(got[1].cast<uintptr_t>());
  req.workspace = reinterpret_cast<void*>(got[3].cast<uintptr_t>());
  req.stream = reinterpret_cast<void*>(got[4].cast<uintptr_t>());
  req.device = in.device;
  req.out.out_f64 = f64;
  if (total_offset >= 0) req.out.total = out_ptr + total_offset;
  if (group_offset >= 0) req.out.per_group = out_ptr + group_offset;
  if (tensor_offset >= 0) req.out.per_tensor = out_ptr + tensor_offset;
  if (flags_offset >= 0) req.out.changed_blocks = reinterpret_cast<uint8_t*>(out_ptr + flags_offset);

  const char* error;
  {
    py::gil_scoped_release nogil;  // launches can block when the launch queue is full
    error = api.launch(tensors.data(), n, &req);
  }
  if (error) throw std::runtime_error(std::string("gradclip CUDA: ") + error);

  result["device_out"] = got[0];
  result["out_f64"] = f64;
  result["total_offset"] = total_offset;
  result["group_offset"] = group_offset;
  result["tensor_offset"] = tensor_offset;
  result["flags_offset"] = flags_offset;
  result["flag_count"] = flag_count;
  // Per-entry results when entries and spans differ (a tensor listed twice).
  bool identity = in.span_of_entry.size() == in.spans.size();
  for (size_t e = 0; identity && e < in.span_of_entry.size(); ++e) identity = in.span_of_entry[e] == int32_t(e);
  if (!identity) {
    py::list idx;
    for (int32_t s : in.span_of_entry) idx.append(s);
    result["entry_spans"] = idx;
  }
}

}  // namespace gradclip::binding
