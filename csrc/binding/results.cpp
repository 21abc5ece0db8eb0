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
    r.devices = array_of(in.devices);
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
    r.device = to_python(d);
    // The list index of each per-entry norm: host facts, known without waiting for the device.
    if (req.want_per_span) r.indices = array_of(in.list_index_of_entry);
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

namespace {

#define GRADCLIP_FIELD_DOC(name, type, init, doc) {const_cast<char*>(#name), const_cast<char*>(doc)},
PyStructSequence_Field g_device_result_fields[] = {GRADCLIP_DEVICE_RESULT_FIELDS(GRADCLIP_FIELD_DOC){nullptr, nullptr}};
PyStructSequence_Field g_result_fields[] = {GRADCLIP_RESULT_FIELDS(GRADCLIP_FIELD_DOC){nullptr, nullptr}};
#undef GRADCLIP_FIELD_DOC

PyStructSequence_Desc g_device_result_desc = {
    const_cast<char*>("gradclip._core.DeviceResult"),
    const_cast<char*>("Where a CUDA call left its results in device memory: byte offsets into buffer."),
    g_device_result_fields, int(sizeof(g_device_result_fields) / sizeof(g_device_result_fields[0]) - 1)};
PyStructSequence_Desc g_result_desc = {
    const_cast<char*>("gradclip._core.Result"),
    const_cast<char*>("What a call did; fields it does not produce are None."), g_result_fields,
    int(sizeof(g_result_fields) / sizeof(g_result_fields[0]) - 1)};

PyTypeObject* g_device_result_type = nullptr;
PyTypeObject* g_result_type = nullptr;

PyObject* as_object(const py::object& o) { return o.inc_ref().ptr(); }
PyObject* as_object(bool b) { return PyBool_FromLong(b); }
PyObject* as_object(int64_t v) { return PyLong_FromLongLong(v); }

template <class Fields>
py::object new_struct(PyTypeObject* type, Fields&& set_all) {
  PyObject* o = PyStructSequence_New(type);
  if (!o) throw py::error_already_set();
  set_all(o);
  return py::reinterpret_steal<py::object>(o);
}

}  // namespace

#define GRADCLIP_SET_FIELD(name, type, init, doc) PyStructSequence_SetItem(o, i++, as_object(r.name));

py::object to_python(const Result& r) {
  return new_struct(g_result_type, [&](PyObject* o) {
    Py_ssize_t i = 0;
    GRADCLIP_RESULT_FIELDS(GRADCLIP_SET_FIELD)
  });
}

py::object to_python(const DeviceResult& r) {
  return new_struct(g_device_result_type, [&](PyObject* o) {
    Py_ssize_t i = 0;
    GRADCLIP_DEVICE_RESULT_FIELDS(GRADCLIP_SET_FIELD)
  });
}

#undef GRADCLIP_SET_FIELD

void register_results(py::module_& m) {
  g_device_result_type = PyStructSequence_NewType(&g_device_result_desc);
  g_result_type = PyStructSequence_NewType(&g_result_desc);
  if (!g_device_result_type || !g_result_type) throw py::error_already_set();
  m.add_object("DeviceResult", reinterpret_cast<PyObject*>(g_device_result_type));
  m.add_object("Result", reinterpret_cast<PyObject*>(g_result_type));
}

}  // namespace gradclip::binding
