// The pybind11 module gradclip._core: each entry point parses its arguments,
// reads the list and picks the backend (call.h), runs the engine
// (engine/engine.h), and converts the outcome (results.h). The kernels run
// with the GIL released. gradclip/_core.pyi describes this interface.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "binding/call.h"
#include "binding/device_resources.h"
#include "binding/fast_call.h"
#include "binding/intake.h"
#include "binding/results.h"
#include "core/clip_rules.h"
#include "core/thread_pool.h"
#include "cpu/agc.h"
#include "cpu/dispatch.h"

namespace py = pybind11;
using namespace gradclip;
using namespace gradclip::binding;

namespace {

py::object clip(py::handle seq, const std::string& kind, std::vector<double> limits, double order, double eps,
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
  if (in.mixed()) return to_python(describe(in));
  engine::Request& req = call.request();

  // A given norm: a number, or a 0-d / 1-element tensor read where it lies
  // (on the device when it is on the gradients' device: no host sync).
  std::unique_ptr<ArgumentTensor> given;
  if (req.given.present) {
    if (py::isinstance<py::float_>(given_norm) || py::isinstance<py::int_>(given_norm)) {
      req.given.value = given_norm.cast<double>();
    } else {
      given = std::make_unique<ArgumentTensor>(given_norm, "total_norm");
      const Span* norm = given->span();
      if (!norm || norm->numel != 1)
        throw py::value_error("total_norm: expected one number (a 0-d or 1-element tensor)");
      if (in.on_cuda() && given->device() == in.device) {
        req.given.in_memory = norm;
      } else if (given->device() != Intake::kHost) {
        throw py::value_error("total_norm: is on cuda:" + std::to_string(given->device()) +
                              ", not on the gradients' device; move it there first (.to(device))");
      } else {
        req.given.value = load_as_double(norm->data, 0, norm->dtype);  // host memory
      }
    }
  }
  engine::Outcome o = call.with_backend([&](engine::Backend& b) { return engine::run(b, req); });
  return to_python(convert(in, req, o, call.resources()));
}

// gradclip._core.clip(seq, *, kind, limits=[], order=2.0, eps=0.0,
// nonfinite="propagate", group_of_item=None, argname, grad_attr=False,
// per_tensor=False, report=False, want_changed=False, given_norm=None,
// split_devices=False, items=None): see _core.pyi.
PyObject* clip_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return translate_errors([&]() -> PyObject* {
    static const char* const names[] = {"seq",       "kind",       "limits",     "order",        "eps",
                                        "nonfinite", "group_of_item", "argname", "grad_attr",    "per_tensor",
                                        "report",    "want_changed", "given_norm", "split_devices", "items"};
    const FastArgs<15> a("clip", names, 1, args, nargs, kwnames);
    auto object = [&](size_t k) { return py::reinterpret_borrow<py::object>(a.handle(k)); };
    a.required(1);
    a.required(7);
    return clip(a.required(0), a.as_string(1, ""), a.as<std::vector<double>>(2, {}, "a sequence of numbers"), a.as_double(3, 2.0),
                a.as_double(4, 0.0), a.as_string(5, "propagate"), object(6), a.as_string(7, ""),
                a.as_bool(8, false), a.as_bool(9, false), a.as_bool(10, false), a.as_bool(11, false), object(12),
                a.as_bool(13, false), object(14))
        .release()
        .ptr();
  });
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

  py::object finish(const std::string& kind, std::vector<double> limits, double eps, const std::string& nonfinite,
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
    std::unique_ptr<ArgumentTensor> stack;
    const Span* combined_span = nullptr;
    if (!combined.is_none()) {
      stack = std::make_unique<ArgumentTensor>(combined, "combined");
      combined_span = stack->span();
      const int64_t per_participant = 2 * int64_t(req.n_groups());
      if (!combined_span || combined_span->dtype != DType::kF64 || combined_span->numel == 0 ||
          combined_span->numel % per_participant != 0 ||
          combined_span->numel / per_participant > INT32_MAX)
        throw py::value_error("combined: expected a float64 array of shape (k, " + std::to_string(req.n_groups()) +
                              ", 2): the group_partials() of k participants, stacked");
      if (stack->device() != call_.intake().device)
        throw py::value_error("combined: must lie on the same device as the tensors");
    }
    finished_ = true;
    engine::Outcome o =
        call_.with_backend([&](engine::Backend& b) { return b.finish(req, combined_span); });
    return to_python(convert(call_.intake(), req, o, call_.resources()));
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
py::object clip_units(py::handle seq, const std::vector<double>& clipping, py::object group_of_item, double eps,
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
  return to_python(r);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gradclip's native core: the tensor intake, the clip engine and its CPU backend. Use the gradclip "
            "package API instead; gradclip/_core.pyi describes this module.";

  binding::register_results(m);
  // Result.devices values besides CUDA device numbers.
  m.attr("HOST") = Intake::kHost;
  m.attr("NO_MEMORY") = Intake::kNoMemory;

  static PyMethodDef clip_def = {"clip", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&clip_entry)),
                                 METH_FASTCALL | METH_KEYWORDS,
                                 "clip(seq, *, kind, limits=[], order=2.0, eps=0.0, nonfinite='propagate', "
                                 "group_of_item=None, argname, grad_attr=False, per_tensor=False, report=False, "
                                 "want_changed=False, given_norm=None, split_devices=False, items=None) -> Result\n\n"
                                 "One fused call: intake, norms, the nonfinite decision, coefficients, writes."};
  m.add_object("clip", py::reinterpret_steal<py::object>(PyCFunction_NewEx(&clip_def, nullptr, m.attr("__name__").ptr())));

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

  m.def("finite_as_reported", &finite_as_reported, py::arg("norm"), py::arg("as_float32"));
  m.def("clip_coefficient", &clip_coefficient, py::arg("max_norm"), py::arg("norm"), py::arg("eps"),
        "torch's rule (core/clip_rules.h), for a coefficient handed to a fused optimizer instead of applied");

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
  m.def("limit_calling_thread", [](int n) { return ThreadPool::limit_calling_thread(n); }, py::arg("n"));
}
