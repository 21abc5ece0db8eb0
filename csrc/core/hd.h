// GRADCLIP_HD marks small functions that both the host compiler and nvcc
// compile, so one definition serves the CPU and the CUDA backends. They are
// static: every translation unit keeps its own copy, so a copy compiled with
// AVX-512 flags (cpu/isa_avx512.cpp) can never be merged into, and then run by,
// the code for other processors.
#pragma once

#ifdef __CUDACC__
#define GRADCLIP_HD static __host__ __device__ __forceinline__
#else
#define GRADCLIP_HD static inline
#endif
