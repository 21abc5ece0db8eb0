// The AVX-512 kernels (isa_avx512_impl.h), bfloat16 rounded in software.
#define GRADCLIP_AVX512_ISA_NS avx512_isa
#define GRADCLIP_AVX512_TABLE_FN avx512_kernels
#define GRADCLIP_AVX512_ISA_NAME "avx512"
#include "cpu/isa_avx512_impl.h"
