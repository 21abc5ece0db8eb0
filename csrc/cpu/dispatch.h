// Runtime choice of the kernel table: the best ISA the CPU supports, optionally
// lowered by GRADCLIP_ISA (scalar | avx2 | avx512) or set_active_isa().
#pragma once

#include <string>
#include <vector>

#include "cpu/isa_kernels.h"

namespace gradclip::cpu {

// Every ISA compiled into this build, lowest first.
std::vector<const IsaKernels*> compiled_isas();
bool cpu_supports(const IsaKernels& isa);
const IsaKernels& active_isa();
// Throws std::invalid_argument for an unknown name or one this CPU cannot run.
void set_active_isa(const std::string& name);

}  // namespace gradclip::cpu
