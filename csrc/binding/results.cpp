#include "binding/results.h"

namespace gradclip::binding {

py::array_t<int32_t> nonfinite_items(const Intake& in, const std::vector<char>& nonfinite_spans) {
  std::vector<int32_t> items;
  for (size_t e = 0; e < in.span_of_entry.size(); ++e)
    if (nonfinite_spans[in.span_of_entry[e]]) items.push_back(in.list_index_of_entry[e]);
  return array_of(items);
}

Result describe(const Intake& in) {
  Result r;
  r.count = static_cast<int64_t>(in.span_of_entry.size());
  r.first_index = in.list_index_of_entry.empty() ? -1 : in.list_index_of_entry.front();
  r.result_f64 = in.has_f64();
  if (in.mixed()) {
    py::list per_device;
    for (const std::vector<int32_t>& items : in.items_by_device) per_device.append(array_of(items));
    r.items_by_device = per_device;
  }
  return r;
}

// The one converter: an engine outcome as a Result.
Result convert(const Intake& in, const engine::Request& req, engine::Outcome& o,
               const PyDeviceResources* device) {
  Result r = describe(in);
  r.result_f64 = !req.total_as_float32;
  r.nonfinite = o.nonfinite;
  r.held = o.held;
  r.written = o.written;
  r.changed = o.changed;
  r.zeroed = o.zeroed;
  if (o.device.present) {
    DeviceResult d;
    d.buffer = device->out();
    d.f64 = o.device.f64;
    d.total_offset = o.device.total_offset;
    d.group_offset = o.device.group_offset;
    d.tensor_offset = o.device.tensor_offset;
    d.flags_offset = o.device.flags_offset;
    d.flag_count = o.device.flag_count;
    d.span_count = static_cast<int64_t>(in.spans.size());
    if (in.has_repeats()) {
      py::list spans;
      for (int32_t s : in.span_of_entry) spans.append(s);
      d.entry_spans = spans;
    }
    r.device = py::cast(std::move(d));
    return r;
  }
  if (req.reduces() || req.given.present) r.total = py::float_(o.total);
  if (req.want_per_span || req.want_report) {
    r.norms = per_entry(in, o.per_span);
    r.indices = array_of(in.list_index_of_entry);
  }
  if (req.want_report) {
    r.group_norms = array_of(o.per_group);
    r.group_coefs = array_of(o.group_coefs);
    if (!o.span_coefs.empty()) r.coefs = per_entry(in, o.span_coefs);
    r.nonfinite_indices = o.nonfinite_spans.empty() ? array_of(std::vector<int32_t>{}) : nonfinite_items(in, o.nonfinite_spans);
  }
  return r;
}

void register_results(py::module_& m) {
  py::class_<DeviceResult>(m, "DeviceResult", "Where a CUDA call left its results in device memory.")
      .def_readonly("buffer", &DeviceResult::buffer)
      .def_readonly("f64", &DeviceResult::f64)
      .def_readonly("total_offset", &DeviceResult::total_offset)
      .def_readonly("group_offset", &DeviceResult::group_offset)
      .def_readonly("tensor_offset", &DeviceResult::tensor_offset)
      .def_readonly("flags_offset", &DeviceResult::flags_offset)
      .def_readonly("flag_count", &DeviceResult::flag_count)
      .def_readonly("span_count", &DeviceResult::span_count)
      .def_readonly("entry_spans", &DeviceResult::entry_spans);

  py::class_<Result>(m, "Result", "What a clip call did; fields it does not produce are None.")
      .def_readonly("count", &Result::count)
      .def_readonly("first_index", &Result::first_index)
      .def_readonly("result_f64", &Result::result_f64)
      .def_readonly("items_by_device", &Result::items_by_device)
      .def_readonly("total", &Result::total)
      .def_readonly("norms", &Result::norms)
      .def_readonly("indices", &Result::indices)
      .def_readonly("group_norms", &Result::group_norms)
      .def_readonly("group_coefs", &Result::group_coefs)
      .def_readonly("coefs", &Result::coefs)
      .def_readonly("nonfinite", &Result::nonfinite)
      .def_readonly("held", &Result::held)
      .def_readonly("nonfinite_indices", &Result::nonfinite_indices)
      .def_readonly("written", &Result::written)
      .def_readonly("changed", &Result::changed)
      .def_readonly("zeroed", &Result::zeroed)
      .def_readonly("device", &Result::device)
      .def_readonly("param_norms", &Result::param_norms)
      .def_readonly("grad_norms", &Result::grad_norms)
      .def_readonly("units", &Result::units)
      .def_readonly("clipped_units", &Result::clipped_units);
}

}  // namespace gradclip::binding
