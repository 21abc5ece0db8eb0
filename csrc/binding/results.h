// What gradclip._core returns: one Result type for every operation (fields an
// operation does not produce are None), and the one converter from an engine
// outcome to it.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "binding/device_resources.h"
#include "binding/intake.h"
#include "engine/engine.h"

namespace gradclip::binding {

namespace py = pybind11;

// Where a CUDA call's results lie in device memory (gradclip._device makes
// framework views of them).
struct DeviceResult {
  py::object buffer = py::none();  // a uint8 tensor / array on the device
  bool f64 = false;
  int64_t total_offset = -1, group_offset = -1, tensor_offset = -1, flags_offset = -1, flag_count = 0;
  int64_t span_count = 0;
  py::object entry_spans = py::none();  // per entry its span, when a tensor was listed twice
};

// What every operation returns; fields an operation does not produce are None.
struct Result {
  int64_t count = 0;         // accepted entries (None grads are skipped)
  int32_t first_index = -1;  // list index of the first accepted entry
  bool result_f64 = false;   // results are float64 (some input is), else float32
  py::object items_by_device = py::none();  // several devices: per device, the list indices on it; nothing computed
  py::object total = py::none();      // float
  py::object norms = py::none();      // per entry, float64
  py::object indices = py::none();    // per entry, its list index
  py::object group_norms = py::none();
  py::object group_coefs = py::none();
  py::object coefs = py::none();      // per entry
  bool nonfinite = false;
  bool held = false;
  py::object nonfinite_indices = py::none();  // list indices of entries whose norm was NaN or inf
  bool written = false;
  bool changed = false;
  int64_t zeroed = 0;
  py::object device = py::none();     // DeviceResult
  // clip_units only
  py::object param_norms = py::none();
  py::object grad_norms = py::none();
  int64_t units = 0;
  int64_t clipped_units = 0;
};

template <class T>
py::array_t<T> array_of(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

// Per accepted entry (list order), the value of its span.
template <class T>
py::array_t<T> per_entry(const Intake& in, const std::vector<T>& per_span) {
  py::array_t<T> out(static_cast<py::ssize_t>(in.span_of_entry.size()));
  T* o = out.mutable_data();
  for (size_t e = 0; e < in.span_of_entry.size(); ++e) o[e] = per_span[in.span_of_entry[e]];
  return out;
}

// List indices of the entries whose span is flagged.
py::array_t<int32_t> nonfinite_items(const Intake& in, const std::vector<char>& nonfinite_spans);

// What every Result says about its input (and, for a list over several
// devices, the items on each).
Result describe(const Intake& in);

// The one converter: an engine outcome as a Result. `device`: where a CUDA
// call's output buffer came from.
Result convert(const Intake& in, const engine::Request& req, engine::Outcome& o, const PyDeviceResources* device);

// Registers Result and DeviceResult on the module.
void register_results(py::module_& m);

}  // namespace gradclip::binding
