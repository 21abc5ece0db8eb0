// The fiber scheduler behind simt.h: the threads of one block are ucontext
// fibers on the calling host thread. The scheduler resumes them in thread
// order; a fiber runs until it waits at a barrier or returns. A barrier
// releases when every thread of its block (or lane of its warp) has arrived,
// and a pass in which no fiber can move while some still live is a barrier
// that will never release: it is reported, and the block abandoned.
#include "cuda_sim/simt.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <utility>

thread_local SimDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gradclip::simt {
namespace {

constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kWarp = 32;
// Each fiber calls the kernel with its parameters by value (up to 32 KB), so
// its stack holds one copy of them besides the kernel's frames.
constexpr size_t kStackBytes = 256 * 1024;
// Inaccessible bytes below each stack: more than one frame's 32 KB of
// parameters, so that an overflow cannot step over them into the next stack.
constexpr size_t kGuardBytes = 64 * 1024;

// A fiber stack with an inaccessible region below it: an overflow faults
// instead of corrupting the neighbouring fiber's stack.
struct Stack {
  void* base = nullptr;
  size_t bytes = 0;
  Stack() {
    bytes = kStackBytes + kGuardBytes;
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base, kGuardBytes, PROT_NONE) != 0) {
      std::perror("gradclip simt: fiber stack");
      std::abort();
    }
  }
  ~Stack() { munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* top_region() const { return static_cast<char*>(base) + (bytes - kStackBytes); }
};

enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<Stack> stack;
  bool done = false;
  Wait wait = Wait::kNone;
  uint64_t wait_generation = 0;
};

struct Block {
  Fiber fibers[kMaxBlockThreads];
  ucontext_t scheduler;
  unsigned threads = 0;
  // Block barrier: arrivals at the barrier under way and completed barriers.
  unsigned block_arrived = 0;
  uint64_t block_generation = 0;
  int or_cells[2] = {0, 0};  // __syncthreads_or accumulators, by generation parity
  unsigned warp_arrived[kMaxBlockThreads / kWarp] = {};
  uint64_t warp_generation[kMaxBlockThreads / kWarp] = {};
  alignas(8) unsigned char shuffle[2][kMaxBlockThreads][8];
  void (*body)(const void*) = nullptr;
  const void* context = nullptr;
};

struct State {
  std::unique_ptr<Block> block = std::make_unique<Block>();
  std::string error;     // sticky until cudaGetLastError
  int error_code = 0;
  std::string reported;  // the last error cudaGetLastError returned
  std::vector<LaunchRecord> log;
  const char* kernel = "";  // the kernel running, for messages
  int device = 0;
  Schedule schedule = Schedule::kForward;
  uint64_t rng = 0;            // splitmix64 state for kShuffled
  uint64_t block_serial = 0;   // counts the blocks run, for poison_shared
  std::vector<std::pair<const void*, uint64_t>> poisoned;  // shared array -> block it was filled for
};

State& state() {
  static thread_local State s;
  return s;
}

Block& current_block() { return *state().block; }

void fiber_entry() {
  Block& b = current_block();
  b.body(b.context);
  b.fibers[threadIdx.x].done = true;
  // Returning resumes uc_link: the scheduler.
}

void wait_here(Wait kind, uint64_t generation) {
  Block& b = current_block();
  Fiber& me = b.fibers[threadIdx.x];
  me.wait = kind;
  me.wait_generation = generation;
  swapcontext(&me.context, &b.scheduler);
}

bool released(const Block& b, unsigned thread) {
  const Fiber& f = b.fibers[thread];
  switch (f.wait) {
    case Wait::kNone: return true;
    case Wait::kBlock: return b.block_generation != f.wait_generation;
    case Wait::kWarp: return b.warp_generation[thread / kWarp] != f.wait_generation;
  }
  return true;
}

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The order of one pass over the block's threads (kForward, kReverse, kShuffled).
void pass_order(std::vector<unsigned>& order, unsigned threads) {
  State& s = state();
  order.resize(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = s.schedule == Schedule::kReverse ? threads - 1 - t : t;
  if (s.schedule == Schedule::kShuffled)
    for (unsigned t = threads - 1; t > 0; --t) std::swap(order[t], order[splitmix64(s.rng) % (t + 1)]);
}

// Resumes thread t if it can move; returns whether it did.
bool step(Block& b, unsigned t) {
  Fiber& f = b.fibers[t];
  if (f.done || !released(b, t)) return false;
  f.wait = Wait::kNone;
  threadIdx = {t, 0, 0};
  swapcontext(&b.scheduler, &f.context);
  return true;
}

// One pass: every thread that can move moves (up to its next wait). Returns
// whether any did.
bool run_pass(Block& b, std::vector<unsigned>& order) {
  bool moved = false;
  if (state().schedule == Schedule::kWarpFirst) {
    for (unsigned w = b.threads / kWarp; w-- > 0;)
      for (bool warp_moved = true; warp_moved;) {
        warp_moved = false;
        for (unsigned lane = 0; lane < kWarp; ++lane) warp_moved |= step(b, w * kWarp + lane);
        moved |= warp_moved;
      }
    return moved;
  }
  pass_order(order, b.threads);
  for (const unsigned t : order) moved |= step(b, t);
  return moved;
}

void run_block(Block& b, const char* kernel) {
  for (unsigned t = 0; t < b.threads; ++t) {
    Fiber& f = b.fibers[t];
    if (!f.stack) f.stack = std::make_unique<Stack>();
    f.done = false;
    f.wait = Wait::kNone;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack->top_region();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  b.block_arrived = 0;
  b.block_generation = 0;
  b.or_cells[0] = b.or_cells[1] = 0;
  for (unsigned w = 0; w < b.threads / kWarp; ++w) b.warp_arrived[w] = 0, b.warp_generation[w] = 0;

  std::vector<unsigned> order;
  for (;;) {
    bool alive = false;
    for (unsigned t = 0; t < b.threads; ++t) alive |= !b.fibers[t].done;
    if (!alive) return;
    if (!run_pass(b, order)) {
      unsigned at_block = 0, at_warp = 0, finished = 0;
      for (unsigned t = 0; t < b.threads; ++t) {
        if (b.fibers[t].done) ++finished;
        else if (b.fibers[t].wait == Wait::kBlock) ++at_block;
        else ++at_warp;
      }
      report(std::string(kernel) + ", block " + std::to_string(blockIdx.x) + ": " + std::to_string(at_block) +
             " threads wait at __syncthreads and " + std::to_string(at_warp) +
             " at a warp shuffle that the other threads (" + std::to_string(finished) +
             " finished) never reach");
      return;  // the stuck fibers are abandoned; their stacks are reset by the next block
    }
  }
}

}  // namespace

void report(const std::string& problem, int code) {
  State& s = state();
  if (!s.error.empty()) return;
  s.error = problem;
  s.error_code = code;
}

void poison_shared(void* array, size_t bytes) {
  State& s = state();
  for (auto& entry : s.poisoned)
    if (entry.first == array) {
      if (entry.second == s.block_serial) return;  // already filled for this block
      entry.second = s.block_serial;
      std::memset(array, 0xff, bytes);
      return;
    }
  s.poisoned.emplace_back(array, s.block_serial);
  std::memset(array, 0xff, bytes);
}

void check_vector_address(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) report("misaligned 16-byte vector access in " + where());
}

std::string where() {
  return std::string(state().kernel) + ", block " + std::to_string(blockIdx.x) + ", thread " +
         std::to_string(threadIdx.x);
}

void block_barrier() {
  Block& b = current_block();
  const uint64_t generation = b.block_generation;
  if (++b.block_arrived == b.threads) {
    // The last to arrive releases the barrier. Every thread has finished
    // reading the previous barrier's __syncthreads_or result (it arrived
    // here after), so that cell is cleared for the next barrier to use.
    b.block_arrived = 0;
    b.block_generation = generation + 1;
    b.or_cells[(generation + 1) & 1] = 0;
    return;
  }
  wait_here(Wait::kBlock, generation);
}

void warp_barrier() {
  Block& b = current_block();
  const unsigned w = threadIdx.x / kWarp;
  const uint64_t generation = b.warp_generation[w];
  if (++b.warp_arrived[w] == kWarp) {
    b.warp_arrived[w] = 0;
    b.warp_generation[w] = generation + 1;
    return;
  }
  wait_here(Wait::kWarp, generation);
}

unsigned char* shuffle_slot(unsigned thread) {
  Block& b = current_block();
  return b.shuffle[b.warp_generation[thread / kWarp] & 1][thread];
}

int* syncthreads_or_cell() {
  Block& b = current_block();
  return &b.or_cells[b.block_generation & 1];
}

void set_schedule(Schedule schedule, uint64_t seed) {
  state().schedule = schedule;
  state().rng = seed;
}

std::vector<LaunchRecord> take_launch_log() { return std::move(state().log); }

void run_grid(const char* kernel, unsigned grid, unsigned block, void (*body)(const void*), const void* context) {
  State& s = state();
  s.log.push_back({kernel, grid, block});
  s.kernel = kernel;
  if (grid == 0 || grid > 0x7fffffffu) {
    report(std::string(kernel) + ": a grid of " + std::to_string(grid) + " blocks", cudaErrorInvalidConfiguration);
    return;
  }
  if (block == 0 || block > kMaxBlockThreads || block % kWarp != 0) {
    report(std::string(kernel) + ": the simulator runs blocks of whole warps, at most 1024 threads",
           cudaErrorInvalidConfiguration);
    return;
  }
  const bool failed_before = !s.error.empty();  // an earlier launch's error, not yet collected
  Block& b = *s.block;
  b.threads = block;
  b.body = body;
  b.context = context;
  blockDim = {block, 1, 1};
  gridDim = {grid, 1, 1};
  for (unsigned g = 0; g < grid; ++g) {
    blockIdx = {g, 0, 0};
    ++s.block_serial;
    run_block(b, kernel);
    if (!failed_before && !s.error.empty()) return;  // as on a GPU, a launch stops at its first failure
  }
}

}  // namespace gradclip::simt

cudaError_t cudaGetDevice(int* device) {
  *device = gradclip::simt::state().device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return cudaErrorInvalidDevice;  // the simulator has one device
  gradclip::simt::state().device = device;
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetLastError() {
  auto& s = gradclip::simt::state();
  if (s.error.empty()) return cudaSuccess;
  s.reported = std::move(s.error);
  s.error.clear();
  return cudaError_t(s.error_code);
}

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaErrorLaunchFailure";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidDevice: return "the simulator has one device, 0";
    default: return gradclip::simt::state().reported.c_str();
  }
}
