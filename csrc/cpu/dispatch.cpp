#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace gradclip::cpu {

std::vector<const IsaKernels*> compiled_isas() {
  std::vector<const IsaKernels*> out{&scalar_kernels()};
#if defined(GRADCLIP_HAVE_AVX2)
  out.push_back(&avx2_kernels());
#endif
#if defined(GRADCLIP_HAVE_AVX512)
  out.push_back(&avx512_kernels());
  out.push_back(&avx512bf16_kernels());
#endif
  return out;
}

bool cpu_supports(const IsaKernels& isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (std::strcmp(isa.name, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa.name, "avx512") == 0) return avx512;
  if (std::strcmp(isa.name, "avx512bf16") == 0) return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  return std::strcmp(isa.name, "scalar") == 0;
}

namespace {

// The best supported ISA, no higher than GRADCLIP_ISA when that names a compiled one.
const IsaKernels* initial_isa() {
  const char* cap = std::getenv("GRADCLIP_ISA");
  const IsaKernels* best = &scalar_kernels();
  for (const IsaKernels* isa : compiled_isas()) {
    if (!cpu_supports(*isa)) break;
    best = isa;
    if (cap && std::strcmp(cap, isa->name) == 0) break;
  }
  return best;
}

std::atomic<const IsaKernels*>& active_slot() {
  static std::atomic<const IsaKernels*> slot{initial_isa()};
  return slot;
}

}  // namespace

const IsaKernels& active_isa() { return *active_slot().load(std::memory_order_acquire); }

void set_active_isa(const std::string& name) {
  for (const IsaKernels* isa : compiled_isas()) {
    if (name != isa->name) continue;
    if (!cpu_supports(*isa)) throw std::invalid_argument("isa: this CPU cannot run '" + name + "'");
    active_slot().store(isa, std::memory_order_release);
    return;
  }
  throw std::invalid_argument("isa: '" + name + "' is not compiled into this build");
}

}  // namespace gradclip::cpu
