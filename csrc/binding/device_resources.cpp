#include "binding/device_resources.h"

#include <string>

namespace py = pybind11;

namespace gradclip::binding {
namespace {

PyObject* g_allocate = nullptr;           // owned reference: the registered allocator
const cuda::Api* g_api_override = nullptr;  // the test hook's backend, or null
PyObject* g_allocate_override = nullptr;  // owned reference

void replace(PyObject*& slot, py::handle value) {
  Py_XDECREF(slot);
  slot = value ? py::reinterpret_borrow<py::object>(value).release().ptr() : nullptr;
}

}  // namespace

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

void set_device_allocator(py::handle allocate) {
  if (!PyCallable_Check(allocate.ptr())) throw py::type_error("allocate: must be callable");
  replace(g_allocate, allocate);
}

void use_cuda_backend(const cuda::Api* api, py::handle allocate) {
  if (api && api->abi_version != cuda::kApiVersion)
    throw py::value_error("api: the table comes from a different build of gradclip");
  replace(g_allocate_override, api ? allocate : py::handle());
  g_api_override = api;
}

engine::DeviceBuffers PyDeviceResources::allocate(int64_t out_bytes, int64_t workspace_bytes) {
  PyObject* allocate = g_allocate_override ? g_allocate_override : g_allocate;
  if (!allocate) throw py::value_error("no device allocator is registered (import gradclip, not gradclip._core)");
  const py::tuple got = py::reinterpret_steal<py::object>(PyObject_CallFunction(
      allocate, "OLL", like_, static_cast<long long>(out_bytes), static_cast<long long>(workspace_bytes)));
  if (!got) throw py::error_already_set();
  kept_.append(got);  // the buffers live as long as this call's results may be read
  out_ = got[0];
  return {reinterpret_cast<char*>(got[1].cast<uintptr_t>()), reinterpret_cast<void*>(got[3].cast<uintptr_t>()),
          reinterpret_cast<void*>(got[4].cast<uintptr_t>())};
}

void PyDeviceResources::unlocked(const std::function<void()>& work) {
  py::gil_scoped_release nogil;
  work();
}

}  // namespace gradclip::binding
