// The CUDA kernels and their launch code (kernels.cu), built by the host
// compiler against simt.h for gradclip._cuda_sim.
#ifndef GRADCLIP_HOST_SIM
#error "build this file with GRADCLIP_HOST_SIM defined (CMakeLists.txt, target _cuda_sim)"
#endif
#include "cuda/kernels.cu"
