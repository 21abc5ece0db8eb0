// One call of gradclip._core, from its Python arguments to a backend ready to
// run: the arguments parsed into an engine request, the list read by the
// intake, and the backend the tensors' device calls for.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "binding/device_resources.h"
#include "binding/intake.h"
#include "engine/cpu_backend.h"
#include "engine/cuda_backend.h"
#include "engine/engine.h"

namespace gradclip::binding {

namespace py = pybind11;

NormOrder parse_order(double p);
Nonfinite parse_nonfinite(const std::string& name);
// Raises ValueError naming `what` unless v >= 0 (NaN is not).
void check_limit(double v, const std::string& what);
// `seq` as a list or tuple, so that it can be read more than once.
py::object as_sequence(py::handle seq, const char* argname);
// Group numbers of the items of `items`, checked against the number of groups
// (None: every item in group 0; with allow_left_out, -1 leaves an item out).
std::vector<int32_t> item_groups(py::handle items, py::object group_of_item, size_t n_groups,
                                 bool allow_left_out = false);

struct CallArgs {
  engine::Request req;
  std::string argname;
  bool grad_attr;
  Access access;
  bool split_devices;
  std::optional<std::vector<int32_t>> only_items;
  py::object group_of_item = py::none();
};

// The arguments every entry point shares, parsed and checked.
CallArgs call_args(const std::string& kind, std::vector<double> limits, double p, double eps,
                   const std::string& nonfinite, const std::string& argname, bool grad_attr, py::object items,
                   bool split_devices);

// A tensor given as an argument of its own (a norm, a stack of partials), read
// by the intake like a list of one: the same protocols, the same rules.
class ArgumentTensor {
 public:
  ArgumentTensor(py::handle obj, const char* argname)
      : holder_(py::make_tuple(obj)), intake_(holder_.ptr(), IntakeOptions{argname, false, Access::kRead}) {}
  // The one span, or null when the argument was empty or not one tensor.
  const Span* span() const { return intake_.spans.size() == 1 ? &intake_.spans[0] : nullptr; }
  int32_t device() const { return intake_.device; }

 private:
  py::tuple holder_;
  Intake intake_;
};

// A call's intake and the backend for its device, kept together (also by
// Reduction, across Python calls).
class Call {
 public:
  // Reads the list (raising on the first broken rule, before anything is
  // written) and picks the backend.
  Call(py::handle seq, CallArgs args);

  const Intake& intake() const { return *intake_; }
  const std::string& argname() const { return args_.argname; }
  engine::Request& request() { return args_.req; }
  bool on_cuda() const { return cuda_ != nullptr; }
  const PyDeviceResources* resources() const { return resources_.get(); }

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
  std::unique_ptr<PyDeviceResources> resources_;
  std::unique_ptr<engine::CudaBackend> cuda_;
};

}  // namespace gradclip::binding
