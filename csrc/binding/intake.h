// Turns the caller's Python sequence into validated dense spans, in one pass of
// raw CPython calls: each item is read by the reader of its protocol
// (readers.h), then checked against one set of rules. Every rule is checked
// for every element before any kernel runs, so a refused call leaves all
// inputs untouched.
#pragma once

#include <Python.h>

#include <cstdint>
#include <string>
#include <vector>

#include "binding/readers.h"
#include "core/span_sink.h"
#include "core/types.h"

namespace gradclip::binding {

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
  // Tensors on several devices, or without memory of their own (a wrapper
  // subclass such as DTensor exports a NULL data pointer): false refuses them
  // (one call, one device, plain memory); true reads and checks them all and
  // reports where each lies (Intake::mixed()), for a caller that handles each
  // device on its own, or each DTensor through its local shard (torch's drop-ins).
  bool split_devices = false;
  // When set, the sink sees every accepted host-memory entry as soon as it is
  // validated (the CPU backend reduces it while the rest of the list is read).
  // Python code that runs while the list is read (a .grad property, a
  // __dlpack__ method) must then not write to tensors earlier in the list:
  // whether the norm sees such a write would depend on timing.
  SpanSink* sink = nullptr;
};

class Intake {
 public:
  Intake(PyObject* sequence, const IntakeOptions& options);
  ~Intake();
  Intake(const Intake&) = delete;
  Intake& operator=(const Intake&) = delete;

  // Unique spans, in order of first appearance in the list. The same memory
  // given twice is one span: counted once, scaled once. Empty when mixed().
  std::vector<Span> spans;
  // One per accepted element (None grads are skipped), in list order.
  std::vector<int32_t> span_of_entry;
  std::vector<int32_t> list_index_of_entry;
  std::vector<int64_t> rows_of_entry;  // filled only with IntakeOptions::rows
  // Per unique span, its first entry.
  int32_t first_entry_of_span(size_t s) const { return first_entry_.empty() ? int32_t(s) : first_entry_[s]; }
  // Whether the same span stands for several entries (a tensor listed twice).
  bool has_repeats() const { return !first_entry_.empty(); }
  bool has_f64() const { return (dtype_mask_ & (1u << int(DType::kF64))) != 0; }

  // Where the tensors are: host memory (kHost) or one CUDA device (its number);
  // kNoMemory (split_devices only) for tensors that have none of their own.
  static constexpr int32_t kHost = -1;
  static constexpr int32_t kNoMemory = -2;
  int32_t device = kHost;  // the first entry's device
  bool on_cuda() const { return device != kHost; }
  // The first tensor on that device (borrowed; kept alive by the intake): the
  // allocator makes device memory and finds the stream from it.
  PyObject* device_example = nullptr;
  // With IntakeOptions::split_devices: whether the entries lie on more than
  // one device or have no memory of their own, and then the devices (in order
  // of first appearance) and the list indices of the entries on each. Nothing
  // else is filled in then (no spans).
  bool mixed() const { return !items_by_device.empty(); }
  std::vector<int32_t> devices;
  std::vector<std::vector<int32_t>> items_by_device;

 private:
  void take(PyObject* item, int32_t list_index, const IntakeOptions& options);
  void validate(const RawTensor& raw, PyObject* obj, int32_t list_index, const IntakeOptions& options);
  void check_device(int32_t device, PyObject* obj, int32_t list_index, const IntakeOptions& options);
  void deduplicate(const IntakeOptions& options);
  void release();

  PyObject* fast_ = nullptr;  // the sequence as a list/tuple (owned)
  // Grads, DLPack capsules and buffer views, released when the call returns:
  // for CUDA input that is once the kernels are queued, which is safe for
  // memory the caller keeps (its gradients) and for allocators that reuse
  // memory in stream order.
  Holdings hold_;
  std::vector<Span> entry_spans_;     // per entry, in list order (a sink reads them)
  std::vector<int32_t> first_entry_;  // per unique span; empty when there are no repeats
  std::vector<int32_t> devices_;      // distinct devices, in order of first appearance
  std::vector<int32_t> device_of_entry_;  // index into devices_; filled once a second device shows
  uint32_t dtype_mask_ = 0;           // bit (1 << DType) for each dtype seen
  int32_t device_item_ = -1;          // list index of the first tensor seen (for messages)
  SpanSink* sink_ = nullptr;
};

// Label used in messages, e.g. "parameters[3].grad".
std::string item_label(const IntakeOptions& options, int64_t index);

}  // namespace gradclip::binding
