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
// hanging, and a 16-byte vector load from an address that is not 16-byte
// aligned (a fault on a GPU) is reported too; shared-memory races show as
// results that differ between schedules (tests/test_cuda_sim.py compares
// them). What it cannot check: races it never schedules into the open, the
// device's own rounding of pow(), and the timing of anything.
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
#define __shared__ static thread_local  // one block runs at a time per host thread

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
void report(const std::string& problem);  // a launch failure, returned by the next cudaGetLastError
std::string where();                      // "kernel, block b, thread t" of the caller
void block_barrier();                     // all threads of the block
void warp_barrier();                      // all lanes of the caller's warp
// Per-thread exchange slots of the warp shuffle: `thread`'s slot for the
// shuffle under way in its warp (two sets, alternating, so that a lane still
// reading the previous shuffle's values is never overwritten).
unsigned char* shuffle_slot(unsigned thread);
int* syncthreads_or_cell();  // the accumulator of the block barrier under way (same alternation)
}  // namespace gradclip::simt

// ---- loads through the read-only cache ----
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline uint4 __ldg(const uint4* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    gradclip::simt::report("misaligned 16-byte vector load in " + gradclip::simt::where());
  uint4 v;
  std::memcpy(&v, p, sizeof v);  // defined on the host even when misaligned (the report says it is wrong)
  return v;
}

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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidDevice = 101, cudaErrorLaunchFailure = 719 };
typedef struct SimStream* cudaStream_t;
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);

// ---- kernel launches ----
namespace gradclip::simt {

enum class Schedule { kForward, kReverse, kShuffled };
// The order runnable threads are resumed in, on this host thread, from the
// next launch on (kShuffled: a fresh permutation from `seed` at every step).
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
