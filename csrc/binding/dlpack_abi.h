// The few DLPack 1.x declarations gradclip needs, written from the DLPack
// specification (https://dmlc.github.io/dlpack/latest/c_api.html). Field order
// and sizes are part of the C ABI; the static_asserts pin them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gradclip::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kROCM = 10, kCUDAManaged = 13 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kOpaque = 3, kBfloat = 4, kComplex = 5, kBool = 6 };

struct Version {
  uint32_t major;
  uint32_t minor;
};

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {  // the legacy (unversioned) capsule "dltensor"
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

constexpr uint64_t kFlagReadOnly = uint64_t(1) << 0;

struct ManagedTensorVersioned {  // capsule "dltensor_versioned"
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned*);
  uint64_t flags;
  Tensor dl_tensor;
};

// The C exchange API a producer hangs on its tensor *type* as a PyCapsule named
// "dlpack_exchange_api" (torch: attribute __dlpack_c_exchange_api__, or
// __c_dlpack_exchange_api__ in torch 2.10). gradclip calls only the two
// non-owning entry points; the rest are declared to keep the layout.
struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;
};

struct ExchangeApi {
  ExchangeApiHeader header;
  void* managed_tensor_allocator;
  int (*managed_tensor_from_py_object_no_sync)(void* py_object, ManagedTensorVersioned** out);
  void* managed_tensor_to_py_object_no_sync;
  // Fills *out with a view that stays valid while the Python object is alive.
  // Returns 0, or -1 with a Python exception set.
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);
  // The producer's current stream for (device_type, device_id).
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};

static_assert(sizeof(Device) == 8, "DLDevice layout");
static_assert(sizeof(DataType) == 4, "DLDataType layout");
static_assert(offsetof(Tensor, ndim) == 16 && offsetof(Tensor, shape) == 24 && sizeof(Tensor) == 48,
              "DLTensor layout");
static_assert(offsetof(ManagedTensorVersioned, flags) == 24 && offsetof(ManagedTensorVersioned, dl_tensor) == 32,
              "DLManagedTensorVersioned layout");
static_assert(offsetof(ExchangeApi, dltensor_from_py_object_no_sync) == 40 &&
                  offsetof(ExchangeApi, current_work_stream) == 48,
              "DLPackExchangeAPI layout");

}  // namespace gradclip::dlpack
