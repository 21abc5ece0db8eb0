// The three ways a Python object can hand over its memory, one reader each:
// torch's DLPack C exchange API (~60 ns), the buffer protocol (NumPy, ~46 ns),
// and the versioned __dlpack__ capsule (any other producer, ~3 us). Each turns
// an object into a RawTensor; the rules every tensor must meet are checked
// afterwards, once, by the intake (intake.cpp).
#pragma once

#include <Python.h>

#include <cstdint>
#include <string>
#include <vector>

#include "binding/dlpack_abi.h"

namespace gradclip::binding {

enum class Access { kRead, kWrite };

// One element as the intake sees it, whatever protocol produced it.
struct RawTensor {
  void* data;
  uint64_t byte_offset;
  dlpack::Device device;
  int ndim;
  dlpack::DataType dtype;
  const int64_t* shape;
  const int64_t* strides;  // elements; may be null
  bool read_only;
};

// Raises the item's error: type(why) as TypeError, value(why) as ValueError,
// with the item's label ("parameters[3].grad: ") in front.
struct ItemFailure {
  virtual ~ItemFailure() = default;
  [[noreturn]] virtual void type(const std::string& why) const = 0;
  [[noreturn]] virtual void value(const std::string& why) const = 0;
};

// What the readers keep alive until the call returns: buffer views to release,
// and references (DLPack capsules, detached views) to drop.
struct Holdings {
  std::vector<PyObject*> owned;
  std::vector<Py_buffer> buffers;
  std::vector<int64_t> element_strides;  // scratch: the strides of the buffer view being read
  size_t expected = 0;                   // items to come: reserved once, so views never move
};

// torch's exchange API of obj's type, cached per type; null when the type has
// none (or GRADCLIP_NO_EXCHANGE_API=1 turns it off).
const dlpack::ExchangeApi* exchange_api_of(PyTypeObject* type);

RawTensor read_exchange_api(const dlpack::ExchangeApi& api, PyObject* obj, const ItemFailure& fail);
RawTensor read_buffer(PyObject* obj, Access access, Holdings& hold, const ItemFailure& fail);
RawTensor read_dlpack_capsule(PyObject* obj, Holdings& hold, const ItemFailure& fail);

// "float32", "int64", "bfloat16x4", ... for messages.
std::string dtype_text(dlpack::DataType t);

std::string type_name(PyObject* obj);

}  // namespace gradclip::binding
