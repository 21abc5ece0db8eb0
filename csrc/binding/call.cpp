#include "binding/call.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

namespace gradclip::binding {
namespace {

ClipKind parse_kind(const std::string& name) {
  if (name == "none") return ClipKind::kNone;
  if (name == "global") return ClipKind::kGlobal;
  if (name == "per_tensor") return ClipKind::kPerTensor;
  if (name == "normalize") return ClipKind::kNormalize;
  if (name == "value") return ClipKind::kValue;
  throw py::value_error("kind: expected 'none', 'global', 'per_tensor', 'normalize' or 'value', got '" + name + "'");
}

// Each unique span's group, from its items' groups: one tensor listed in two
// groups is refused, since it cannot follow two limits.
Grouping span_groups(const Intake& in, const std::vector<int32_t>& group_of_item, int32_t n_groups,
                     const IntakeOptions& labels) {
  Grouping g;
  g.n_groups = n_groups;
  g.group_of_span.assign(in.spans.size(), -1);
  std::vector<int32_t> first_item_of_span(in.spans.size(), -1);
  for (size_t e = 0; e < in.span_of_entry.size(); ++e) {
    const int32_t item = in.list_index_of_entry[e];
    const int32_t s = in.span_of_entry[e];
    if (g.group_of_span[s] < 0) {
      g.group_of_span[s] = group_of_item[item];
      first_item_of_span[s] = item;
    } else if (g.group_of_span[s] != group_of_item[item]) {
      throw py::value_error(item_label(labels, item) + ": the same memory as " +
                            item_label(labels, first_item_of_span[s]) +
                            " but in another group; one tensor cannot follow two limits");
    }
  }
  return g;
}

}  // namespace

NormOrder parse_order(double p) {
  if (!(p > 0.0)) {
    throw py::value_error("norm order must be > 0 or inf, got " + std::to_string(p) +
                          " (0, negative and NaN orders are not norms gradclip computes)");
  }
  return NormOrder::from_p(p);
}


// 'error' and 'skip' are the same natively: write nothing; the caller raises or skips.
Nonfinite parse_nonfinite(const std::string& name) {
  if (name == "propagate") return Nonfinite::kPropagate;
  if (name == "error" || name == "skip") return Nonfinite::kHold;
  if (name == "zero") return Nonfinite::kZero;
  throw py::value_error("nonfinite: expected 'propagate', 'error', 'skip' or 'zero', got '" + name + "'");
}

void check_limit(double v, const std::string& what) {
  if (!(v >= 0.0)) throw py::value_error(what + " must be >= 0 (and not NaN), got " + std::to_string(v));
}

// `seq` as a list or tuple, so that it can be read more than once (a
// generator such as model.parameters() cannot).
py::object as_sequence(py::handle seq, const char* argname) {
  PyObject* fast = PySequence_Fast(seq.ptr(), "");
  if (!fast) {
    PyErr_Clear();
    throw py::type_error(std::string(argname) + ": expected a sequence of tensors or arrays, got " +
                         Py_TYPE(seq.ptr())->tp_name);
  }
  return py::reinterpret_steal<py::object>(fast);
}

// Group numbers of the items of `items` (a list or tuple, one per item),
// checked against the number of groups. None: every item in group 0. With
// allow_left_out, -1 marks an item to leave out.
std::vector<int32_t> item_groups(py::handle items, py::object group_of_item, size_t n_groups,
                                 bool allow_left_out) {
  const Py_ssize_t n_items = PySequence_Size(items.ptr());
  if (n_items < 0) throw py::error_already_set();
  if (group_of_item.is_none()) return std::vector<int32_t>(n_items, 0);
  const auto groups = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(group_of_item);
  if (!groups) throw py::type_error("group_of_item: expected a sequence of integers");
  if (groups.ndim() != 1 || groups.shape(0) != n_items)
    throw py::value_error("group_of_item: expected one group per item (" + std::to_string(n_items) + "), got " +
                          std::to_string(groups.size()));
  std::vector<int32_t> out(groups.data(), groups.data() + n_items);
  for (Py_ssize_t i = 0; i < n_items; ++i)
    if (out[i] < (allow_left_out ? -1 : 0) || out[i] >= int64_t(n_groups))
      throw py::value_error("group_of_item[" + std::to_string(i) + "]: group " + std::to_string(out[i]) +
                            " has no limit (" + std::to_string(n_groups) + " given)");
  return out;
}


CallArgs call_args(const std::string& kind, std::vector<double> limits, double p, double eps,
                   const std::string& nonfinite, const std::string& argname, bool grad_attr, py::object items,
                   bool split_devices) {
  CallArgs a;
  a.req.kind = parse_kind(kind);
  a.req.order = parse_order(p);
  check_limit(eps, "eps");
  a.req.eps = eps;
  a.req.nonfinite = parse_nonfinite(nonfinite);
  if (a.req.kind != ClipKind::kNone) {
    if (limits.empty()) throw py::value_error("limits: expected one limit per group, got none");
    for (size_t g = 0; g < limits.size(); ++g) check_limit(limits[g], "limits[" + std::to_string(g) + "]");
  }
  a.req.limits = std::move(limits);
  a.argname = argname;
  a.grad_attr = grad_attr;
  a.access = a.req.kind == ClipKind::kNone ? Access::kRead : Access::kWrite;
  a.split_devices = split_devices;
  if (!items.is_none()) a.only_items = items.cast<std::vector<int32_t>>();
  return a;
}

Call::Call(py::handle seq, CallArgs args) : args_(std::move(args)), cpu_(args_.req.order) {
  items_ = as_sequence(seq, args_.argname.c_str());
  IntakeOptions options{args_.argname.c_str(), args_.grad_attr, args_.access};
  options.split_devices = args_.split_devices;
  if (args_.only_items) options.only_items = &*args_.only_items;
  // The CPU backend reduces small tensors while the list is read.
  if (args_.req.reduces()) options.sink = cpu_.sink();
  const int32_t n_groups = static_cast<int32_t>(args_.req.limits.size());
  const bool grouped = !args_.group_of_item.is_none();
  std::vector<int32_t> groups;
  if (grouped) groups = item_groups(items_, args_.group_of_item, n_groups);
  intake_ = std::make_unique<Intake>(items_.ptr(), options);
  if (grouped && !intake_->mixed()) args_.req.groups = span_groups(*intake_, groups, n_groups, options);
  args_.req.total_as_float32 = !intake_->has_f64();
  if (intake_->mixed()) return;
  if (intake_->on_cuda()) {
    resources_ = std::make_unique<PyDeviceResources>(intake_->device_example);
    cuda_ = std::make_unique<engine::CudaBackend>(intake_->spans, intake_->device, cuda_api(), *resources_);
  } else {
    const std::vector<int32_t>* first_entries = intake_->has_repeats() ? &first_entries_ : nullptr;
    if (first_entries)
      for (size_t s = 0; s < intake_->spans.size(); ++s) first_entries_.push_back(intake_->first_entry_of_span(s));
    cpu_.set_spans(intake_->spans, intake_->span_of_entry.size(), first_entries);
  }
}

}  // namespace gradclip::binding
