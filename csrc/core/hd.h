// GRADCLIP_HD marks small functions that both the host compiler and nvcc
// compile, so one definition serves the CPU and the CUDA backends.
#pragma once

#ifdef __CUDACC__
#define GRADCLIP_HD __host__ __device__ __forceinline__
#else
#define GRADCLIP_HD inline
#endif
