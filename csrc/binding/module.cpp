// The pybind11 module gradclip._core: parse the arguments, read the list
// (Intake), run the engine (engine/engine.h) on the backend the tensors' device
// calls for, convert the outcome (one Result type). The kernels run with the
// GIL released. gradclip/_core.pyi describes this interface.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "binding/device_resources.h"
#include "binding/intake.h"
#include "core/clip_rules.h"
#include "core/thread_pool.h"
#include "cpu/agc.h"
#include "cpu/dispatch.h"
#include "engine/cpu_backend.h"
#include "engine/cuda_backend.h"

namespace py = pybind11;
using namespace gradclip;
using binding::Access;
using binding::Intake;
using binding::IntakeOptions;

namespace {

// ---- arguments ----

NormOrder parse_order(double p) {
  if (!(p > 0.0)) {
    throw py::value_error("norm order must be > 0 or inf, got " + std::to_string(p) +
                          " (0, negative and NaN orders are not norms gradclip computes)");
  }
  return NormOrder::from_p(p);
}

ClipKind parse_kind(const std::string& name) {
  if (name == "none") return ClipKind::kNone;
  if (name == "global") return ClipKind::kGlobal;
  if (name == "per_tensor") return ClipKind::kPerTensor;
  if (name == "normalize") return ClipKind::kNormalize;
  if (name == "value") return ClipKind::kValue;
  throw py::value_error("kind: expected 'none', 'global', 'per_tensor', 'normalize' or 'value', got '" + name + "'");
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
                                 bool allow_left_out = false) {
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
      throw py::value_error(binding::item_label(labels, item) + ": the same memory as " +
                            binding::item_label(labels, first_item_of_span[s]) +
                            " but in another group; one tensor cannot follow two limits");
    }
  }
  return g;
}

// ---- results ----

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
               const binding::PyDeviceResources* device) {
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

// ---- one call: intake, backend, engine ----

struct CallArgs {
  engine::Request req;
  std::string argname;
  bool grad_attr;
  Access access;
  bool split_devices;
  std::optional<std::vector<int32_t>> only_items;
  py::object group_of_item = py::none();
};

// A call's intake and the backend for its device, kept together (also by
// Reduction, across Python calls).
class Call {
 public:
  Call(py::handle seq, CallArgs args) : args_(std::move(args)), cpu_(args_.req.order) {
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
      resources_ = std::make_unique<binding::PyDeviceResources>(intake_->device_example);
      cuda_ = std::make_unique<engine::CudaBackend>(intake_->spans, intake_->device, binding::cuda_api(), *resources_);
    } else {
      const std::vector<int32_t>* first_entries = intake_->has_repeats() ? &first_entries_ : nullptr;
      if (first_entries)
        for (size_t s = 0; s < intake_->spans.size(); ++s) first_entries_.push_back(intake_->first_entry_of_span(s));
      cpu_.set_spans(intake_->spans, intake_->span_of_entry.size(), first_entries);
    }
  }

  const Intake& intake() const { return *intake_; }
  const std::string& argname() const { return args_.argname; }
  engine::Request& request() { return args_.req; }
  bool on_cuda() const { return cuda_ != nullptr; }
  engine::Backend& backend() { return cuda_ ? static_cast<engine::Backend&>(*cuda_) : cpu_; }
  const binding::PyDeviceResources* resources() const { return resources_.get(); }

  // Runs `work` on the backend: the CPU one without the GIL; the CUDA one
  // keeps it (it calls the allocator) and lets go around its launches.
  template <class Fn>
  auto with_backend(Fn&& work) {
    if (cuda_) return work(*cuda_);
    py::gil_scoped_release nogil;
    return work(cpu_);
  }

 private:
  CallArgs args_;
  py::object items_;
  engine::CpuBackend cpu_;
  std::unique_ptr<Intake> intake_;
  std::vector<int32_t> first_entries_;
  std::unique_ptr<binding::PyDeviceResources> resources_;
  std::unique_ptr<engine::CudaBackend> cuda_;
};

// A norm given instead of computed: a number, or a 0-d / 1-element tensor read
// where it lies (read on the device when it is on the gradients' device).
struct GivenNormArg {
  std::unique_ptr<Intake> intake;
  py::tuple holder;
};

// ---- entry points ----

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

Result clip(py::handle seq, const std::string& kind, std::vector<double> limits, double order, double eps,
            const std::string& nonfinite, py::object group_of_item, const std::string& argname, bool grad_attr,
            bool per_tensor, bool report, bool want_changed, py::object given_norm, bool split_devices,
            py::object items) {
  CallArgs a = call_args(kind, std::move(limits), order, eps, nonfinite, argname, grad_attr, items,
                         split_devices);
  a.req.want_per_span = per_tensor;
  a.req.want_report = report;
  a.req.want_changed = want_changed;
  a.group_of_item = group_of_item;
  if (!given_norm.is_none()) {
    if (a.req.kind != ClipKind::kGlobal) throw py::value_error("given_norm: only for kind='global'");
    a.req.given.present = true;
  }
  Call call(seq, a);
  const Intake& in = call.intake();
  if (in.mixed()) return describe(in);
  engine::Request& req = call.request();

  GivenNormArg given;
  if (req.given.present) {
    if (py::isinstance<py::float_>(given_norm) || py::isinstance<py::int_>(given_norm)) {
      req.given.value = given_norm.cast<double>();
    } else {
      given.holder = py::make_tuple(given_norm);
      given.intake = std::make_unique<Intake>(given.holder.ptr(), IntakeOptions{"total_norm", false, Access::kRead});
      const Intake& norm = *given.intake;
      if (norm.spans.size() != 1 || norm.spans[0].numel != 1)
        throw py::value_error("total_norm: expected one number (a 0-d or 1-element tensor)");
      if (in.on_cuda() && norm.device == in.device) {
        req.given.in_memory = &norm.spans[0];
      } else if (norm.on_cuda()) {
        throw py::value_error("total_norm: is on cuda:" + std::to_string(norm.device) +
                              ", not on the gradients' device; move it there first (.to(device))");
      } else {
        req.given.value = load_as_double(norm.spans[0].data, 0, norm.spans[0].dtype);  // host memory
      }
    }
  }
  engine::Outcome o = call.with_backend([&](engine::Backend& b) { return engine::run(b, req); });
  return convert(in, req, o, call.resources());
}

// The engine's seam, held across Python calls: the local power sums of a
// list, to be combined (e.g. over processes) and then finished.
class Reduction {
 public:
  Reduction(py::handle seq, CallArgs args) : call_(seq, std::move(args)) {
    if (call_.intake().mixed())
      throw py::value_error(call_.argname() + ": tensors on several devices; reduce each device's "
                            "tensors on their own");
    call_.with_backend([&](engine::Backend& b) {
      b.reduce(call_.request());
      return 0;
    });
  }

  // Each group's partial power sum as a (n_groups, 2) float64 array of
  // (sum, base) rows: host memory, or a view of device memory.
  py::object group_partials() {
    check_open();
    if (!partials_.is_none()) return partials_;
    engine::Request& req = call_.request();
    const engine::GroupPartials g = call_.with_backend([&](engine::Backend& b) { return b.group_partials(req); });
    if (!call_.on_cuda()) {
      py::array_t<double> a({py::ssize_t(g.host.size()), py::ssize_t(2)});
      std::memcpy(a.mutable_data(), g.host.data(), g.host.size() * sizeof(Partial));
      partials_ = a;
    } else {
      partials_ = py::make_tuple(call_.resources()->out(), g.device_offset, req.n_groups());
    }
    return partials_;
  }

  py::tuple summary() {
    check_open();
    engine::Request& req = call_.request();
    const engine::Backend::Summary s = call_.with_backend([&](engine::Backend& b) { return b.summary(req); });
    return py::make_tuple(s.total, s.nonfinite);
  }

  Result finish(const std::string& kind, std::vector<double> limits, double eps, const std::string& nonfinite,
                py::object combined, bool per_tensor, bool report, py::object result_f64) {
    check_open();
    engine::Request& req = call_.request();
    const CallArgs parsed = call_args(kind, std::move(limits), req.order.p, eps, nonfinite, "parameters", false,
                                      py::none(), false);
    if (parsed.req.kind != ClipKind::kNone && parsed.req.limits.size() != size_t(req.n_groups()))
      throw py::value_error("limits: expected one per group (" + std::to_string(req.n_groups()) + "), got " +
                            std::to_string(parsed.req.limits.size()));
    if (parsed.req.nonfinite == Nonfinite::kZero && req.nonfinite != Nonfinite::kZero)
      throw py::value_error("nonfinite: 'zero' repairs while reducing; pass it to reduce()");
    req.kind = parsed.req.kind;
    req.limits = parsed.req.limits;
    req.eps = parsed.req.eps;
    if (parsed.req.nonfinite != Nonfinite::kZero) req.nonfinite = parsed.req.nonfinite;
    req.want_per_span = per_tensor;
    req.want_report = report;
    // Participants of a combine whose inputs differ in dtype agree on one
    // result dtype, so that they hold (or not) on the same total.
    if (!result_f64.is_none()) req.total_as_float32 = !result_f64.cast<bool>();
    std::unique_ptr<Intake> combined_intake;
    py::tuple holder;
    const Span* combined_span = nullptr;
    if (!combined.is_none()) {
      holder = py::make_tuple(combined);
      combined_intake = std::make_unique<Intake>(holder.ptr(), IntakeOptions{"combined", false, Access::kRead});
      const Intake& c = *combined_intake;
      const Span& s = c.spans.empty() ? Span{nullptr, 0, DType::kF64} : c.spans[0];
      const int64_t per_participant = 2 * int64_t(req.n_groups());
      if (c.spans.size() != 1 || s.dtype != DType::kF64 || s.numel == 0 || s.numel % per_participant != 0 ||
          s.numel / per_participant > INT32_MAX)
        throw py::value_error("combined: expected a float64 array of shape (k, " + std::to_string(req.n_groups()) +
                              ", 2): the group_partials() of k participants, stacked");
      if (c.device != call_.intake().device)
        throw py::value_error("combined: must lie on the same device as the tensors");
      combined_span = &c.spans[0];
    }
    finished_ = true;
    engine::Outcome o =
        call_.with_backend([&](engine::Backend& b) { return b.finish(req, combined_span); });
    return convert(call_.intake(), req, o, call_.resources());
  }

 private:
  void check_open() const {
    if (finished_) throw py::value_error("this reduction is finished; reduce again");
  }
  Call call_;
  py::object partials_ = py::none();
  bool finished_ = false;
};

std::unique_ptr<Reduction> reduce(py::handle seq, double order, const std::string& nonfinite,
                                  py::object group_of_item, int32_t n_groups, const std::string& argname,
                                  bool grad_attr, py::object items) {
  if (n_groups < 1) throw py::value_error("n_groups: must be >= 1");
  CallArgs a = call_args("none", {}, order, 0.0, nonfinite, argname, grad_attr, items, false);
  a.access = Access::kWrite;  // finish() may write
  a.group_of_item = group_of_item;
  a.req.limits.assign(size_t(n_groups), 0.0);  // sized for the groups; finish() sets them
  a.req.want_report = true;  // finish() may report: the per-span nonfinite flags are taken while reducing
  if (group_of_item.is_none() && n_groups != 1)
    throw py::value_error("n_groups: without group_of_item every item is in group 0 (n_groups 1)");
  return std::make_unique<Reduction>(seq, std::move(a));
}

// Adaptive gradient clipping over `seq` (parameters with .grad): each gradient
// row is limited to clipping * max(||parameter row||, eps), with one clipping
// factor per group (group -1: left out). The parameters and their gradients
// are all validated before any gradient is written.
Result clip_units(py::handle seq, const std::vector<double>& clipping, py::object group_of_item, double eps,
                  double order, const std::string& nonfinite, const std::string& argname_s) {
  const char* argname = argname_s.c_str();
  cpu::UnitClipRequest req;
  req.order = parse_order(order);
  req.nonfinite = parse_nonfinite(nonfinite);
  if (clipping.empty()) throw py::value_error("clipping: expected one factor per group, got none");
  for (size_t g = 0; g < clipping.size(); ++g)
    if (!(clipping[g] > 0.0) || std::isinf(clipping[g]))
      throw py::value_error("clipping[" + std::to_string(g) + "] must be > 0 and finite, got " +
                            std::to_string(clipping[g]));
  check_limit(eps, "eps");
  req.eps = eps;
  const py::object items = as_sequence(seq, argname);
  const std::vector<int32_t> group = item_groups(items, group_of_item, clipping.size(), true);
  std::vector<int32_t> taken;  // items in a group (not -1): the others are not even read
  for (size_t i = 0; i < group.size(); ++i)
    if (group[i] >= 0) taken.push_back(static_cast<int32_t>(i));

  IntakeOptions grad_options{argname, true, Access::kWrite, true};
  grad_options.only_items = &taken;
  Intake grads(items.ptr(), grad_options);
  if (grads.on_cuda())
    throw py::value_error(std::string(argname) + ": adaptive gradient clipping (agc) is not available for CUDA "
                          "tensors yet; it runs on CPU tensors");
  // The parameters of those gradients only (a frozen parameter is not read):
  // parameter entry k belongs to gradient entry k.
  IntakeOptions param_options{argname, false, Access::kRead, true};
  param_options.only_items = &grads.list_index_of_entry;
  Intake params(items.ptr(), param_options);
  // Unique gradient span s becomes tensor s of the request (spans are numbered
  // in order of first appearance, so visiting entries in order meets them in order).
  std::vector<cpu::RowSpan> param_rows, grad_rows;
  param_rows.reserve(grads.spans.size());
  grad_rows.reserve(grads.spans.size());
  for (size_t e = 0; e < grads.span_of_entry.size(); ++e) {
    const int32_t s = grads.span_of_entry[e];
    if (size_t(s) < grad_rows.size()) continue;  // the same gradient again: clipped once
    const int32_t item = grads.list_index_of_entry[e];
    const Span& g = grads.spans[s];
    const Span& w = params.spans[params.span_of_entry[e]];
    const int64_t g_rows = grads.rows_of_entry[e], w_rows = params.rows_of_entry[e];
    if (g_rows != w_rows || g.numel != w.numel)
      throw py::value_error(binding::item_label(grad_options, item) + ": " + std::to_string(g_rows) + " rows of " +
                            std::to_string(g.numel) + " elements in all, but its parameter has " +
                            std::to_string(w_rows) + " rows of " + std::to_string(w.numel) +
                            "; a gradient must have its parameter's shape");
    grad_rows.push_back({g, g_rows});
    param_rows.push_back({w, w_rows});
    req.clipping.push_back(clipping[group[item]]);
  }
  cpu::UnitClipOutcome u;
  {
    py::gil_scoped_release nogil;
    u = cpu::clip_units(param_rows, grad_rows, req);
  }
  Result r = describe(grads);
  r.param_norms = per_entry(grads, u.param_norms);
  r.grad_norms = per_entry(grads, u.grad_norms);
  r.norms = r.grad_norms;
  r.total = py::float_(u.grad_total);
  r.indices = array_of(grads.list_index_of_entry);
  r.units = u.units;
  r.clipped_units = u.clipped_units;
  r.nonfinite = u.nonfinite;
  r.held = holds(req.nonfinite, u.nonfinite);
  r.nonfinite_indices = nonfinite_items(grads, u.nonfinite_grads);
  r.zeroed = u.zeroed;
  return r;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gradclip's native core: the tensor intake, the clip engine and its CPU backend. Use the gradclip "
            "package API instead; gradclip/_core.pyi describes this module.";

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

  m.def("clip", &clip, py::arg("seq"), py::kw_only(), py::arg("kind"), py::arg("limits") = std::vector<double>{},
        py::arg("order") = 2.0, py::arg("eps") = 0.0, py::arg("nonfinite") = "propagate",
        py::arg("group_of_item") = py::none(), py::arg("argname"), py::arg("grad_attr") = false,
        py::arg("per_tensor") = false, py::arg("report") = false, py::arg("want_changed") = false,
        py::arg("given_norm") = py::none(), py::arg("split_devices") = false, py::arg("items") = py::none());

  py::class_<Reduction>(m, "Reduction", "The engine's seam: local power sums, to combine, then finish.")
      .def("group_partials", &Reduction::group_partials)
      .def("summary", &Reduction::summary)
      .def("finish", &Reduction::finish, py::kw_only(), py::arg("kind"), py::arg("limits") = std::vector<double>{},
           py::arg("eps") = 0.0, py::arg("nonfinite") = "propagate", py::arg("combined") = py::none(),
           py::arg("per_tensor") = false, py::arg("report") = false, py::arg("result_f64") = py::none());
  m.def("reduce", &reduce, py::arg("seq"), py::kw_only(), py::arg("order") = 2.0, py::arg("nonfinite") = "propagate",
        py::arg("group_of_item") = py::none(), py::arg("n_groups") = 1, py::arg("argname"),
        py::arg("grad_attr") = false, py::arg("items") = py::none());

  m.def("clip_units", &clip_units, py::arg("seq"), py::kw_only(), py::arg("clipping"),
        py::arg("group_of_item") = py::none(), py::arg("eps"), py::arg("order") = 2.0,
        py::arg("nonfinite") = "propagate", py::arg("argname"));

  m.def("set_device_allocator", &binding::set_device_allocator, py::arg("allocate"));
  m.def("_use_cuda_backend", [](py::object capsule, py::object allocate) {
    if (capsule.is_none()) return binding::use_cuda_backend(nullptr, py::none());
    auto* api = static_cast<const cuda::Api*>(PyCapsule_GetPointer(capsule.ptr(), "gradclip._cuda.api"));
    if (!api) throw py::error_already_set();  // not a capsule, or not gradclip's table
    if (!PyCallable_Check(allocate.ptr())) throw py::type_error("allocate: must be callable");
    binding::use_cuda_backend(api, allocate);
  }, py::arg("api"), py::arg("allocate"), "Test hook: see binding/device_resources.h.");

  m.def("clip_coefficient", &clip_coefficient, py::arg("max_norm"), py::arg("norm"), py::arg("eps"));
  m.def("finite_as_reported", &finite_as_reported, py::arg("norm"), py::arg("as_float32"));

  m.def("compiled_isas", [] {
    std::vector<std::string> names;
    for (const cpu::IsaKernels* isa : cpu::compiled_isas()) names.push_back(isa->name);
    return names;
  });
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (const cpu::IsaKernels* isa : cpu::compiled_isas())
      if (cpu::cpu_supports(*isa)) names.push_back(isa->name);
    return names;
  });
  m.def("active_isa", [] { return std::string(cpu::active_isa().name); });
  m.def("set_active_isa", [](const std::string& name) { cpu::set_active_isa(name); }, py::arg("name"));
  m.def("num_threads", [] { return ThreadPool::instance().num_threads(); });
  m.def("set_num_threads", [](int n) { ThreadPool::instance().set_num_threads(n); }, py::arg("n"));
}
