// The CUDA names kernels.cu uses, defined for the host compiler, so that the
// kernels' own source runs on the CPU for the tests (gradclip._cuda_sim): on
// machines without a GPU this is the only way the kernels execute.
//
// Execution model. A launch runs its blocks one after another; the threads of
// a block are fibers (ucontext) on the calling thread, switched only at
// barriers: every thread runs up to its next __syncthreads or shuffle before
// any passes it. Which runnable thread goes first is the schedule's choice
// (thread order, reverse order, or a seeded random order at every step); a
// GPU may interleave threads between barriers in any way, so a kernel whose
// results change with the schedule has a race. Shared memory is a
// function-local static (one block at a time), kernel launches are
// synchronous, streams are ignored, device memory is host memory.
//
// What it checks beyond the results: a barrier some threads of a block (or
// lanes of a warp) never reach is reported as a launch failure instead of
// hanging; a 16-byte vector access (kernels.cu's __ldg, load_vector and
// store_vector) at an address that is not 16-byte aligned, a fault on a GPU,
// is reported too; shared memory starts every block filled with NaN bytes (on
// a GPU it is undefined), so a slot read before any thread wrote it shows;
// and shared-memory races show as results that differ between schedules
// (tests/test_cuda_sim.py compares them). What it cannot check: races none of
// its schedules brings into the open, the device's own rounding of pow(), and
// the timing of anything.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/types.h"

// ---- qualifiers ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
// Shared arrays are declared with GRADCLIP_SHARED (kernels.cu): here a static
// (one block runs at a time per host thread) filled with NaN bytes at the
// start of every block.
#define GRADCLIP_SHARED(type, name, count)     \
  static thread_local type name[count];        \
  ::gradclip::simt::poison_shared(name, sizeof(name))

// ---- built-in variables (set by the scheduler before a fiber resumes) ----
struct SimDim3 {
  unsigned x = 0, y = 0, z = 0;
};
extern thread_local SimDim3 threadIdx, blockIdx, blockDim, gridDim;

// ---- vector and bit types ----
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline float __uint_as_float(uint32_t u) { return gradclip::bits_to_float(u); }
inline uint32_t __float_as_uint(float f) { return gradclip::float_to_bits(f); }

// Half and bfloat16 in the shapes cuda_fp16.h / cuda_bf16.h give them. The
// conversions round to nearest even, as __float2half_rn and
// __float2bfloat16_rn do for every non-NaN value (the kernels store NaN
// themselves).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) { return gradclip::f16_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {gradclip::float_to_f16(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {gradclip::float_to_bf16(f)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

namespace gradclip::simt {
// A launch failure, returned by the next cudaGetLastError (code: a
// cudaError_t; 719 is cudaErrorLaunchFailure).
void report(const std::string& problem, int code = 719);
std::string where();                      // "kernel, block b, thread t" of the caller
void block_barrier();                     // all threads of the block
void warp_barrier();                      // all lanes of the caller's warp
// Per-thread exchange slots of the warp shuffle: `thread`'s slot for the
// shuffle under way in its warp (two sets, alternating, so that a lane still
// reading the previous shuffle's values is never overwritten).
unsigned char* shuffle_slot(unsigned thread);
int* syncthreads_or_cell();  // the accumulator of the block barrier under way (same alternation)
// Fills a shared array with 0xff bytes the first time a thread of the current
// block declares it.
void poison_shared(void* array, size_t bytes);
void check_vector_address(const void* p);  // reports a 16-byte access off the 16-byte grid
}  // namespace gradclip::simt

// ---- loads through the read-only cache ----
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
// Checked, then done with memcpy, which is defined on the host even at a
// misaligned address (the report already says it is wrong).
inline uint4 __ldg(const uint4* p) {
  gradclip::simt::check_vector_address(p);
  uint4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
namespace gradclip::simt {
inline uint4 load_vector(const uint4* p) { return __ldg(p); }
inline void store_vector(uint4* p, const uint4& v) {
  check_vector_address(p);
  std::memcpy(p, &v, sizeof v);
}
}  // namespace gradclip::simt

// ---- barriers and warp shuffles ----
inline void __syncthreads() { gradclip::simt::block_barrier(); }

inline int __syncthreads_or(int predicate) {
  int* cell = gradclip::simt::syncthreads_or_cell();
  *cell |= predicate != 0;
  gradclip::simt::block_barrier();
  return *cell;
}

template <class T>
T __shfl_down_sync(unsigned mask, T value, int delta) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  if (mask != 0xffffffffu) gradclip::simt::report("a partial-warp shuffle (the simulator has full-warp ones only) in " +
                                                      gradclip::simt::where());
  const unsigned lane = threadIdx.x % 32;
  // Both slots are of this shuffle's set: taken before the barrier moves the warp on.
  unsigned char* source = lane + unsigned(delta) < 32 ? gradclip::simt::shuffle_slot(threadIdx.x + delta) : nullptr;
  std::memcpy(gradclip::simt::shuffle_slot(threadIdx.x), &value, sizeof(T));
  gradclip::simt::warp_barrier();
  if (source) std::memcpy(&value, source, sizeof(T));
  return value;
}

// ---- the runtime calls kernels.cu makes ----
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719
};
typedef struct SimStream* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyDeviceToHost = 2 };
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetLastError();
// Kernels run to completion at launch here: a copy is a memcpy, a stream has nothing left to wait for.
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);

// ---- kernel launches ----
namespace gradclip::simt {

enum class Schedule { kForward, kReverse, kShuffled, kWarpFirst };
// The order runnable threads are resumed in, on this host thread, from the
// next launch on. kForward / kReverse: thread order or its reverse at every
// step; kShuffled: a fresh permutation from `seed` at every step; kWarpFirst:
// the warps in reverse order, each resumed until none of its lanes can move
// (it runs through all its shuffles before any other warp moves).
void set_schedule(Schedule schedule, uint64_t seed);

struct LaunchRecord {
  std::string kernel;
  unsigned grid, block;
};
// Every launch on this host thread since the last call, in order.
std::vector<LaunchRecord> take_launch_log();

// Runs body() as every thread of every block of a grid.
void run_grid(const char* kernel, unsigned grid, unsigned block, void (*body)(const void*), const void* context);

template <class Params>
struct Launch {
  const char* kernel;
  void (*entry)(Params);
  unsigned grid, block;
  void operator()(const Params& params) const {
    struct Context {
      void (*entry)(Params);
      const Params* params;
    } context{entry, &params};
    run_grid(kernel, grid, block, [](const void* c) {
      const auto* ctx = static_cast<const Context*>(c);
      ctx->entry(*ctx->params);
    }, &context);
  }
};

template <class Params>
Launch<Params> launch(const char* kernel, void (*entry)(Params), unsigned grid, unsigned block) {
  return {kernel, entry, grid, block};
}

}  // namespace gradclip::simt

#define GRADCLIP_LAUNCH(kernel, grid, block, stream) ::gradclip::simt::launch(#kernel, kernel, grid, block)
