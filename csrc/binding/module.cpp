// The pybind11 module gradclip._core: one entry point per operation, each taking
// the whole list. Parsing and validation happen in Intake (with the GIL); the
// kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>

#include "binding/intake.h"
#include "core/clip_math.h"
#include "core/thread_pool.h"
#include "cpu/dispatch.h"
#include "cpu/ops.h"

namespace py = pybind11;
using namespace gradclip;
using binding::Access;
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

// Per accepted entry (list order), the norm of its span.
py::array_t<double> per_entry(const Intake& in, const std::vector<double>& per_span) {
  py::array_t<double> out(static_cast<py::ssize_t>(in.span_of_entry.size()));
  double* o = out.mutable_data();
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
  Intake in(seq.ptr(), {argname, grad_attr, Access::kRead});
  cpu::Norms r;
  {
    py::gil_scoped_release nogil;
    r = cpu::compute_norms(in.spans, order);
  }
  py::dict d = describe(in);
  d["total"] = r.total;
  if (per_tensor) {
    d["norms"] = per_entry(in, r.per_span);
    d["indices"] = list_indices(in);
  }
  return d;
}

enum class ClipMode { kGlobal, kPerTensor, kNormalize };

// Norm, coefficient and rescale in one call. With skip_nonfinite the rescale is
// skipped when the total norm is NaN or inf (the caller then raises or skips).
py::dict clip_norm(py::handle seq, double max_norm, double p, double eps, const std::string& mode_name,
                   const char* argname, bool grad_attr, bool per_tensor, bool skip_nonfinite) {
  const NormOrder order = parse_order(p);
  ClipMode mode;
  if (mode_name == "global") mode = ClipMode::kGlobal;
  else if (mode_name == "per_tensor") mode = ClipMode::kPerTensor;
  else if (mode_name == "normalize") mode = ClipMode::kNormalize;
  else throw py::value_error("mode: expected 'global', 'per_tensor' or 'normalize', got '" + mode_name + "'");
  if (!(max_norm >= 0.0)) throw py::value_error("max_norm must be >= 0, got " + std::to_string(max_norm));
  if (!(eps >= 0.0)) throw py::value_error("eps must be >= 0, got " + std::to_string(eps));

  Intake in(seq.ptr(), {argname, grad_attr, Access::kWrite});
  cpu::Norms r;
  double coef = 1.0;
  bool scaled = false;
  {
    py::gil_scoped_release nogil;
    r = cpu::compute_norms(in.spans, order);
    std::vector<double> coefs(in.spans.size(), 1.0);
    if (mode == ClipMode::kPerTensor) {
      for (size_t s = 0; s < coefs.size(); ++s) coefs[s] = clip_coefficient(max_norm, r.per_span[s], eps);
    } else {
      coef = mode == ClipMode::kGlobal ? clip_coefficient(max_norm, r.total, eps)
                                       : normalize_coefficient(max_norm, r.total);
      coefs.assign(coefs.size(), coef);
    }
    if (!(skip_nonfinite && !std::isfinite(r.total))) {
      for (double c : coefs) scaled |= c != 1.0;
      cpu::scale(in.spans, coefs);
    }
  }
  py::dict d = describe(in);
  d["total"] = r.total;
  d["coef"] = coef;
  d["scaled"] = scaled;
  if (per_tensor) {
    d["norms"] = per_entry(in, r.per_span);
    d["indices"] = list_indices(in);
  }
  return d;
}

py::dict scale(py::handle seq, double coef, const char* argname, bool grad_attr) {
  Intake in(seq.ptr(), {argname, grad_attr, Access::kWrite});
  {
    py::gil_scoped_release nogil;
    cpu::scale(in.spans, std::vector<double>(in.spans.size(), coef));
  }
  return describe(in);
}

py::dict clamp(py::handle seq, double limit, const char* argname, bool grad_attr) {
  if (!(limit >= 0.0)) throw py::value_error("clip_value must be >= 0, got " + std::to_string(limit));
  Intake in(seq.ptr(), {argname, grad_attr, Access::kWrite});
  bool changed;
  {
    py::gil_scoped_release nogil;
    changed = cpu::clamp_symmetric(in.spans, limit);
  }
  py::dict d = describe(in);
  d["changed"] = changed;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gradclip's native core (CPU kernels and tensor intake). Use the gradclip package API instead.";

  m.def("norms", &norms, py::arg("seq"), py::arg("p"), py::arg("argname"), py::arg("grad_attr"),
        py::arg("per_tensor"));
  m.def("clip_norm", &clip_norm, py::arg("seq"), py::arg("max_norm"), py::arg("p"), py::arg("eps"), py::arg("mode"),
        py::arg("argname"), py::arg("grad_attr"), py::arg("per_tensor"), py::arg("skip_nonfinite"));
  m.def("scale", &scale, py::arg("seq"), py::arg("coef"), py::arg("argname"), py::arg("grad_attr"));
  m.def("clamp", &clamp, py::arg("seq"), py::arg("limit"), py::arg("argname"), py::arg("grad_attr"));

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
