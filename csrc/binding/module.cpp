// The pybind11 module gradclip._core: one entry point per operation, each taking
// the whole list. Parsing and validation happen in Intake (with the GIL); the
// kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <string>

#include "binding/cuda_bridge.h"
#include "binding/intake.h"
#include "core/clip_math.h"
#include "core/thread_pool.h"
#include "cpu/agc.h"
#include "cpu/clip.h"
#include "cpu/dispatch.h"
#include "cpu/ops.h"

namespace py = pybind11;
using namespace gradclip;
using binding::Access;
using binding::CudaJob;
using binding::Intake;
using binding::IntakeOptions;

namespace {

NormOrder parse_order(double p) {
  if (!(p > 0.0)) {
    throw py::value_error("norm order must be > 0 or inf, got " + std::to_string(p) +
                          " (0, negative and NaN orders are not norms gradclip computes)");
  }
  return NormOrder::from_p(p);
}

// Per accepted entry (list order), the value of its span.
template <class T>
py::array_t<T> per_entry(const Intake& in, const std::vector<T>& per_span) {
  py::array_t<T> out(static_cast<py::ssize_t>(in.span_of_entry.size()));
  T* o = out.mutable_data();
  for (size_t e = 0; e < in.span_of_entry.size(); ++e) o[e] = per_span[in.span_of_entry[e]];
  return out;
}

py::array_t<int32_t> list_indices(const Intake& in) {
  return py::array_t<int32_t>(static_cast<py::ssize_t>(in.list_index_of_entry.size()), in.list_index_of_entry.data());
}

// What every operation reports about its input besides its own result.
py::dict describe(const Intake& in) {
  py::dict d;
  d["dtype_mask"] = in.dtype_mask;
  d["count"] = in.span_of_entry.size();
  d["first_index"] = in.list_index_of_entry.empty() ? -1 : in.list_index_of_entry.front();
  return d;
}

py::dict norms(py::handle seq, double p, const char* argname, bool grad_attr, bool per_tensor) {
  const NormOrder order = parse_order(p);
  cpu::NormStream stream(order);
  IntakeOptions options{argname, grad_attr, Access::kRead};
  options.stream = &stream;
  Intake in(seq.ptr(), options);
  if (in.on_cuda()) {
    py::dict d = describe(in);
    CudaJob job;
    job.request.job = cuda::Job::kNorms;
    job.request.order = order;
    job.want_total = true;
    job.want_per_tensor = per_tensor;
    binding::run_on_cuda(in, job, d);
    if (per_tensor) d["indices"] = list_indices(in);
    return d;
  }
  cpu::Norms r;
  {
    py::gil_scoped_release nogil;
    const auto known = binding::close_stream(in, stream);
    r = cpu::compute_norms(in.spans, order, {}, known.get());
  }
  py::dict d = describe(in);
  d["total"] = r.total;
  if (per_tensor) {
    d["norms"] = per_entry(in, r.per_span);
    d["indices"] = list_indices(in);
  }
  return d;
}

cpu::ClipMode parse_mode(const std::string& name) {
  if (name == "global") return cpu::ClipMode::kGlobal;
  if (name == "per_tensor") return cpu::ClipMode::kPerTensor;
  if (name == "normalize") return cpu::ClipMode::kNormalize;
  if (name == "value") return cpu::ClipMode::kValue;
  throw py::value_error("mode: expected 'global', 'per_tensor', 'normalize' or 'value', got '" + name + "'");
}

cuda::Job cuda_job(cpu::ClipMode mode) {
  switch (mode) {
    case cpu::ClipMode::kPerTensor: return cuda::Job::kClipPerTensor;
    case cpu::ClipMode::kNormalize: return cuda::Job::kNormalize;
    default: return cuda::Job::kClipGlobal;
  }
}

// 'error' and 'skip' are the same natively: write nothing; the caller raises or skips.
cpu::NonfinitePolicy parse_nonfinite(const std::string& name) {
  if (name == "propagate") return cpu::NonfinitePolicy::kPropagate;
  if (name == "error" || name == "skip") return cpu::NonfinitePolicy::kHold;
  if (name == "zero") return cpu::NonfinitePolicy::kZero;
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

// Group numbers of the items of `seq` (a list or tuple, one per item), checked
// against the number of groups. None: every item in group 0. With
// allow_left_out, -1 marks an item to leave out.
std::vector<int32_t> item_groups(py::handle seq, py::object group_of_item, size_t n_groups,
                                 bool allow_left_out = false) {
  const Py_ssize_t n_items = PySequence_Size(seq.ptr());
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

// Norm, coefficient and rescale in one call, on one group. With skip_nonfinite
// nothing is written when a norm is NaN or inf (the caller then raises or skips).
py::dict clip_norm(py::handle seq, double max_norm, double p, double eps, const std::string& mode_name,
                   const char* argname, bool grad_attr, bool per_tensor, bool skip_nonfinite) {
  cpu::ClipRequest req;
  req.order = parse_order(p);
  req.mode = parse_mode(mode_name);
  if (req.mode == cpu::ClipMode::kValue) throw py::value_error("mode: 'value' is not a norm clip; use clamp");
  check_limit(max_norm, "max_norm");
  check_limit(eps, "eps");
  req.eps = eps;
  req.limits = {max_norm};
  req.nonfinite = skip_nonfinite ? cpu::NonfinitePolicy::kHold : cpu::NonfinitePolicy::kPropagate;

  cpu::NormStream stream(req.order);
  IntakeOptions options{argname, grad_attr, Access::kWrite};
  options.stream = &stream;
  Intake in(seq.ptr(), options);
  // The total is reported as float32 unless an input is float64 (as the CUDA outputs are).
  req.float32_total = !in.has_f64();
  if (in.on_cuda()) {
    py::dict d = describe(in);
    CudaJob job;
    job.request.job = cuda_job(req.mode);
    job.request.order = req.order;
    job.request.eps = eps;
    job.request.hold_nonfinite = skip_nonfinite;
    job.limits = {max_norm};
    job.want_total = true;
    job.want_per_tensor = per_tensor;
    binding::run_on_cuda(in, job, d);
    if (per_tensor) d["indices"] = list_indices(in);
    return d;
  }
  cpu::ClipOutcome r;
  {
    py::gil_scoped_release nogil;
    const auto known = binding::close_stream(in, stream);
    req.known = known.get();
    r = cpu::clip(in.spans, req);
  }
  py::dict d = describe(in);
  d["total"] = r.norms.total;
  d["coef"] = r.group_coefs.empty() ? 1.0 : r.group_coefs[0];
  d["scaled"] = r.written;
  if (per_tensor) {
    d["norms"] = per_entry(in, r.norms.per_span);
    d["indices"] = list_indices(in);
  }
  return d;
}

// cpu::clip's outcome, computed on the device. The general clip reports
// floats (training records), so here the host waits for the results: one sync.
cpu::ClipOutcome clip_on_cuda(const Intake& in, const cpu::ClipRequest& req, const char* argname) {
  if (req.nonfinite == cpu::NonfinitePolicy::kZero)
    throw py::value_error(std::string(argname) + ": nonfinite='zero' is not available for CUDA tensors yet; use "
                          "'propagate', 'error' or 'skip'");
  const bool grouped = req.groups.n_groups > 0;
  const size_t n = in.spans.size();
  const size_t n_groups = grouped ? req.groups.n_groups : 1;
  auto group_of = [&](size_t s) { return grouped ? req.groups.group_of_span[s] : 0; };
  const bool value = req.mode == cpu::ClipMode::kValue;
  if (value)
    for (double l : req.limits)
      if (l != req.limits[0])
        throw py::value_error(std::string(argname) + ": value clipping with a different limit per group is not "
                              "available for CUDA tensors yet");

  CudaJob job;
  job.request.job = value ? cuda::Job::kNorms : cuda_job(req.mode);
  job.request.order = req.order;
  job.request.eps = req.eps;
  job.request.hold_nonfinite = req.nonfinite == cpu::NonfinitePolicy::kHold;
  job.limits = req.limits;
  if (grouped) job.group_of_span = req.groups.group_of_span;
  job.want_total = job.want_per_group = job.want_per_tensor = true;
  job.force_f64 = true;  // the record gets the device's exact values
  py::dict d;
  binding::run_on_cuda(in, job, d);
  static PyObject* to_host = py::object(py::module_::import("gradclip._device").attr("to_host")).release().ptr();
  const py::array_t<uint8_t> bytes = py::reinterpret_steal<py::object>(
      PyObject_CallFunctionObjArgs(to_host, d["device_out"].ptr(), nullptr));
  if (!bytes) throw py::error_already_set();
  auto at = [&](const char* key, size_t i) {
    double v;
    std::memcpy(&v, bytes.data() + d[key].cast<int64_t>() + 8 * i, 8);
    return v;
  };

  cpu::ClipOutcome r;
  r.norms.total = at("total_offset", 0);
  r.norms.per_span.resize(n);
  r.nonfinite_spans.resize(n);
  for (size_t s = 0; s < n; ++s) {
    r.norms.per_span[s] = at("tensor_offset", s);
    r.nonfinite_spans[s] = !std::isfinite(r.norms.per_span[s]);
    r.nonfinite |= r.nonfinite_spans[s] != 0;
  }
  r.nonfinite |= !finite_as_reported(r.norms.total, req.float32_total);
  if (grouped)
    for (size_t g = 0; g < n_groups; ++g) r.norms.per_group.push_back(at("group_offset", g));
  const bool hold = r.nonfinite && req.nonfinite == cpu::NonfinitePolicy::kHold;
  r.span_coefs.assign(n, 1.0);
  if (value) {
    if (!hold) {
      CudaJob clamp;
      clamp.request.job = cuda::Job::kClamp;
      clamp.request.clamp_limit = req.limits[0];
      clamp.want_changed = true;
      py::dict c;
      binding::run_on_cuda(in, clamp, c);
      r.written = py::module_::import("gradclip._device").attr("any_flag")(c).cast<bool>();
    }
    return r;
  }
  // The same coefficients the finalize kernel computed, from the same doubles.
  if (req.mode == cpu::ClipMode::kPerTensor) {
    for (size_t s = 0; s < n; ++s)
      r.span_coefs[s] = clip_coefficient(req.limits[group_of(s)], r.norms.per_span[s], req.eps);
  } else {
    r.group_coefs.resize(n_groups);
    for (size_t g = 0; g < n_groups; ++g) {
      const double norm = grouped ? r.norms.per_group[g] : r.norms.total;
      r.group_coefs[g] = req.mode == cpu::ClipMode::kGlobal ? clip_coefficient(req.limits[g], norm, req.eps)
                                                              : normalize_coefficient(req.limits[g], norm);
    }
    for (size_t s = 0; s < n; ++s) r.span_coefs[s] = r.group_coefs[group_of(s)];
  }
  if (!hold)
    for (size_t s = 0; s < n; ++s) r.written |= r.span_coefs[s] != 1.0 && in.spans[s].numel > 0;
  return r;
}

// The general clip: items in groups with a limit each, any mode, any nonfinite
// policy, per-entry norms and coefficients for monitoring.
//   group_of_item: None (one group), or one group number per item of `seq`
//   limits:        one per group (max norm, target norm or clip value)
py::dict clip(py::handle seq, const std::vector<double>& limits, py::object group_of_item, double p, double eps,
              const std::string& mode_name, const std::string& nonfinite, const char* argname, bool grad_attr) {
  cpu::ClipRequest req;
  req.order = parse_order(p);
  req.mode = parse_mode(mode_name);
  req.nonfinite = parse_nonfinite(nonfinite);
  check_limit(eps, "eps");
  req.eps = eps;
  if (limits.empty()) throw py::value_error("limits: expected one limit per group, got none");
  for (size_t g = 0; g < limits.size(); ++g) check_limit(limits[g], "limits[" + std::to_string(g) + "]");
  req.limits = limits;

  const bool grouped = !group_of_item.is_none();
  const py::object items = as_sequence(seq, argname);
  const std::vector<int32_t> group = item_groups(items, group_of_item, limits.size());
  cpu::NormStream stream(req.order);
  IntakeOptions options{argname, grad_attr, Access::kWrite};
  options.stream = &stream;
  Intake in(items.ptr(), options);
  if (grouped) {
    req.groups.n_groups = static_cast<int32_t>(limits.size());
    req.groups.group_of_span.assign(in.spans.size(), -1);
    std::vector<int32_t> first_item_of_span(in.spans.size(), -1);
    for (size_t e = 0; e < in.span_of_entry.size(); ++e) {
      const int32_t item = in.list_index_of_entry[e];
      const int32_t s = in.span_of_entry[e];
      if (req.groups.group_of_span[s] < 0) {
        req.groups.group_of_span[s] = group[item];
        first_item_of_span[s] = item;
      } else if (req.groups.group_of_span[s] != group[item]) {
        const IntakeOptions labels{argname, grad_attr, Access::kWrite};
        throw py::value_error(binding::item_label(labels, item) + ": the same memory as " +
                              binding::item_label(labels, first_item_of_span[s]) +
                              " but in another group; one tensor cannot follow two limits");
      }
    }
  }

  cpu::ClipOutcome r;
  if (in.on_cuda()) {
    r = clip_on_cuda(in, req, argname);
  } else {
    py::gil_scoped_release nogil;
    const auto known = binding::close_stream(in, stream);
    req.known = known.get();
    r = cpu::clip(in.spans, req);
  }
  std::vector<int32_t> nonfinite_items;
  for (size_t e = 0; e < in.span_of_entry.size(); ++e)
    if (r.nonfinite_spans[in.span_of_entry[e]]) nonfinite_items.push_back(in.list_index_of_entry[e]);

  py::dict d = describe(in);
  d["total"] = r.norms.total;
  d["group_norms"] = py::array_t<double>(static_cast<py::ssize_t>(r.norms.per_group.size()), r.norms.per_group.data());
  d["group_coefs"] = py::array_t<double>(static_cast<py::ssize_t>(r.group_coefs.size()), r.group_coefs.data());
  d["norms"] = per_entry(in, r.norms.per_span);
  d["coefs"] = per_entry(in, r.span_coefs);
  d["indices"] = list_indices(in);
  d["nonfinite"] = r.nonfinite;
  d["nonfinite_indices"] = py::array_t<int32_t>(static_cast<py::ssize_t>(nonfinite_items.size()), nonfinite_items.data());
  d["written"] = r.written;
  d["zeroed"] = r.zeroed;
  return d;
}

// Adaptive gradient clipping over `seq` (parameters with .grad): each gradient
// row is limited to clipping * max(||parameter row||, eps), with one clipping
// factor per group (group -1: left out). The parameters and their gradients
// are all validated before any gradient is written.
py::dict clip_units(py::handle seq, const std::vector<double>& clipping, py::object group_of_item, double eps,
                    double p, const std::string& nonfinite, const char* argname) {
  cpu::UnitClipRequest req;
  req.order = parse_order(p);
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

  const IntakeOptions grad_options{argname, true, Access::kWrite, true, &taken};
  Intake grads(items.ptr(), grad_options);
  if (grads.on_cuda())
    throw py::value_error(std::string(argname) + ": adaptive gradient clipping (agc) is not available for CUDA "
                          "tensors yet; it runs on CPU tensors");
  // The parameters of those gradients only (a frozen parameter is not read):
  // parameter entry k belongs to gradient entry k.
  const IntakeOptions param_options{argname, false, Access::kRead, true, &grads.list_index_of_entry};
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
  cpu::UnitClipOutcome r;
  {
    py::gil_scoped_release nogil;
    r = cpu::clip_units(param_rows, grad_rows, req);
  }
  std::vector<int32_t> nonfinite_items;
  for (size_t e = 0; e < grads.span_of_entry.size(); ++e)
    if (r.nonfinite_grads[grads.span_of_entry[e]]) nonfinite_items.push_back(grads.list_index_of_entry[e]);
  py::dict d = describe(grads);
  d["param_norms"] = per_entry(grads, r.param_norms);
  d["grad_norms"] = per_entry(grads, r.grad_norms);
  d["total"] = r.grad_total;
  d["indices"] = list_indices(grads);
  d["units"] = r.units;
  d["clipped_units"] = r.clipped_units;
  d["nonfinite"] = r.nonfinite;
  d["nonfinite_indices"] = py::array_t<int32_t>(static_cast<py::ssize_t>(nonfinite_items.size()), nonfinite_items.data());
  d["zeroed"] = r.zeroed;
  return d;
}

py::dict scale(py::handle seq, double coef, const char* argname, bool grad_attr) {
  Intake in(seq.ptr(), {argname, grad_attr, Access::kWrite});
  if (in.on_cuda()) {
    py::dict d = describe(in);
    CudaJob job;
    job.request.job = cuda::Job::kScale;
    job.request.coef = coef;
    binding::run_on_cuda(in, job, d);
    return d;
  }
  {
    py::gil_scoped_release nogil;
    cpu::scale(in.spans, std::vector<double>(in.spans.size(), coef));
  }
  return describe(in);
}

py::dict clamp(py::handle seq, double limit, const char* argname, bool grad_attr, bool want_changed) {
  if (!(limit >= 0.0)) throw py::value_error("clip_value must be >= 0, got " + std::to_string(limit));
  Intake in(seq.ptr(), {argname, grad_attr, Access::kWrite});
  if (in.on_cuda()) {
    py::dict d = describe(in);
    CudaJob job;
    job.request.job = cuda::Job::kClamp;
    job.request.clamp_limit = limit;
    job.want_changed = want_changed;
    binding::run_on_cuda(in, job, d);
    return d;
  }
  bool changed;
  {
    py::gil_scoped_release nogil;
    changed = cpu::clamp_symmetric(in.spans, std::vector<double>(in.spans.size(), limit));
  }
  py::dict d = describe(in);
  d["changed"] = changed;
  return d;
}

// torch's clip_grads_with_norm_: scale by min(max_norm / (total_norm + eps), 1)
// where total_norm is a 0-d or 1-element tensor. On CUDA the coefficient is
// computed on the device from the norm's memory: no host sync.
py::dict scale_by_norm(py::handle seq, double max_norm, py::handle total_norm, double eps, const char* argname,
                       bool grad_attr) {
  check_limit(max_norm, "max_norm");
  Intake in(seq.ptr(), {argname, grad_attr, Access::kWrite});
  const py::tuple one = py::make_tuple(total_norm);
  Intake norm(one.ptr(), {"total_norm", false, Access::kRead});
  if (norm.spans.size() != 1 || norm.spans[0].numel != 1)
    throw py::value_error("total_norm: expected one number (a 0-d or 1-element tensor)");
  if (in.on_cuda() && norm.device == in.device) {
    py::dict d = describe(in);
    CudaJob job;
    job.request.job = cuda::Job::kScale;
    job.request.max_norm = max_norm;
    job.request.eps = eps;
    job.norm = &norm.spans[0];
    binding::run_on_cuda(in, job, d);
    return d;
  }
  if (norm.on_cuda())
    throw py::value_error("total_norm: is on cuda:" + std::to_string(norm.device) +
                          ", not on the gradients' device; move it there first (.to(device))");
  const double total = load_as_double(norm.spans[0].data, 0, norm.spans[0].dtype);
  const double coef = clip_coefficient(max_norm, total, eps);
  if (in.on_cuda()) {  // a norm in host memory: the coefficient is known here
    py::dict d = describe(in);
    CudaJob job;
    job.request.job = cuda::Job::kScale;
    job.request.coef = coef;
    binding::run_on_cuda(in, job, d);
    return d;
  }
  {
    py::gil_scoped_release nogil;
    cpu::scale(in.spans, std::vector<double>(in.spans.size(), coef));
  }
  return describe(in);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gradclip's native core (CPU kernels and tensor intake). Use the gradclip package API instead.";
  py::register_exception<binding::MixedDevices>(m, "MixedDevicesError", PyExc_ValueError);

  m.def("norms", &norms, py::arg("seq"), py::arg("p"), py::arg("argname"), py::arg("grad_attr"),
        py::arg("per_tensor"));
  m.def("clip_norm", &clip_norm, py::arg("seq"), py::arg("max_norm"), py::arg("p"), py::arg("eps"), py::arg("mode"),
        py::arg("argname"), py::arg("grad_attr"), py::arg("per_tensor"), py::arg("skip_nonfinite"));
  m.def("clip", &clip, py::arg("seq"), py::arg("limits"), py::arg("group_of_item"), py::arg("p"), py::arg("eps"),
        py::arg("mode"), py::arg("nonfinite"), py::arg("argname"), py::arg("grad_attr"));
  m.def("clip_units", &clip_units, py::arg("seq"), py::arg("clipping"), py::arg("group_of_item"), py::arg("eps"),
        py::arg("p"), py::arg("nonfinite"), py::arg("argname"));
  m.def("scale", &scale, py::arg("seq"), py::arg("coef"), py::arg("argname"), py::arg("grad_attr"));
  m.def("clamp", &clamp, py::arg("seq"), py::arg("limit"), py::arg("argname"), py::arg("grad_attr"),
        py::arg("want_changed") = true);
  m.def("scale_by_norm", &scale_by_norm, py::arg("seq"), py::arg("max_norm"), py::arg("total_norm"), py::arg("eps"),
        py::arg("argname"), py::arg("grad_attr"));

  m.def("_use_cuda_backend", [](py::object capsule, py::object allocate) {
    if (capsule.is_none()) return binding::use_cuda_backend(nullptr, py::none());
    auto* api = static_cast<const cuda::Api*>(PyCapsule_GetPointer(capsule.ptr(), "gradclip._cuda.api"));
    if (!api) throw py::error_already_set();  // not a capsule, or not gradclip's table
    if (!PyCallable_Check(allocate.ptr())) throw py::type_error("allocate: must be callable");
    binding::use_cuda_backend(api, allocate);
  }, py::arg("api"), py::arg("allocate"), "Test hook: see binding/cuda_bridge.h.");

  m.def("clip_coefficient", &clip_coefficient, py::arg("max_norm"), py::arg("norm"), py::arg("eps"));

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
