// Turns the caller's Python sequence into validated dense spans, in one pass of
// raw CPython calls. Every rule is checked for every element before any kernel
// runs, so a refused call leaves all inputs untouched.
#pragma once

#include <Python.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/types.h"
#include "cpu/ops.h"

namespace gradclip::binding {

enum class Access { kRead, kWrite };

// Raised (as gradclip._core.MixedDevicesError, a ValueError) when one call
// holds tensors on two devices: the torch drop-ins catch it and fall back to
// torch's per-device scheme.
struct MixedDevices : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct IntakeOptions {
  const char* argname;  // used in error messages: "<argname>[<i>]"
  bool grad_attr;       // read item.grad and skip items whose .grad is None (torch's parameters)
  Access access;
  // Record each entry's rows (first dimension; 0-d and 1-d tensors are one row)
  // and refuse tensors whose rows are not contiguous blocks of memory.
  bool rows = false;
  // When set, only these items of the sequence are taken (in this order); the
  // others are neither read nor checked. Messages keep the items' own indices.
  const std::vector<int32_t>* only_items = nullptr;
  // When set, the stream sees every accepted (host-memory) entry as soon as it
  // is validated, so that worker threads reduce it while the rest of the list
  // is read. The caller closes the stream once the Intake is built. Python
  // code that runs while the list is read (a .grad property, a __dlpack__
  // method) must then not write to tensors earlier in the list: whether the
  // norm sees such a write would depend on timing (before, it always did).
  cpu::NormStream* stream = nullptr;
};

class Intake {
 public:
  Intake(PyObject* sequence, const IntakeOptions& options);
  ~Intake();
  Intake(const Intake&) = delete;
  Intake& operator=(const Intake&) = delete;

  // Unique spans, in order of first appearance in the list. The same memory
  // given twice is one span: counted once, scaled once.
  std::vector<Span> spans;
  // One per accepted element (None grads are skipped), in list order.
  std::vector<int32_t> span_of_entry;
  // Per unique span, its first entry.
  int32_t first_entry_of_span(size_t s) const { return first_entry_.empty() ? int32_t(s) : first_entry_[s]; }
  std::vector<int32_t> list_index_of_entry;
  std::vector<int64_t> rows_of_entry;  // filled only with IntakeOptions::rows
  uint32_t dtype_mask = 0;  // bit (1 << DType) for each dtype seen
  // Results are float64 when some input is, else float32.
  bool has_f64() const { return (dtype_mask & (1u << int(DType::kF64))) != 0; }

  // Where the tensors are: host memory (kHost) or one CUDA device (its
  // number). One call takes tensors on one device; mixing is refused.
  static constexpr int32_t kHost = -1;
  int32_t device = kHost;
  bool on_cuda() const { return device != kHost; }
  // The first tensor on that device (borrowed; kept alive by the intake): the
  // allocator makes device memory and finds the stream from it.
  PyObject* device_example = nullptr;

 private:
  void take(PyObject* item, int32_t list_index, const IntakeOptions& options);
  void check_device(int32_t device, PyObject* obj, int32_t list_index, const IntakeOptions& options);
  void deduplicate(const IntakeOptions& options);
  void release();

  PyObject* fast_ = nullptr;          // the sequence as a list/tuple (owned)
  // Grads and DLPack capsules, released when the call returns: for CUDA input
  // that is once the kernels are queued, which is safe for memory the caller
  // keeps (its gradients) and for allocators that reuse memory in stream order.
  std::vector<PyObject*> owned_;
  std::vector<Py_buffer> buffers_;    // buffer-protocol views to release
  std::vector<int64_t> element_strides_;  // scratch: the strides of the buffer view being taken
  std::vector<Span> entry_spans_;         // per entry, in list order (a stream reads them)
  std::vector<int32_t> first_entry_;      // per unique span; empty when there are no repeats
  int32_t device_item_ = -1;  // list index of the first tensor seen (for messages)
  cpu::NormStream* stream_ = nullptr;
};

// Closes `stream` (which `in` fed) and returns the power sums it computed,
// per unique span of `in`; null when it computed none.
std::unique_ptr<cpu::KnownPowerSums> close_stream(const Intake& in, cpu::NormStream& stream);

// Label used in messages, e.g. "parameters[3].grad".
std::string item_label(const IntakeOptions& options, int64_t index);

}  // namespace gradclip::binding
