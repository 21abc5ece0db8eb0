// The AVX-512 kernels (isa_avx512_impl.h) with AVX512_BF16's conversion instruction
// for bfloat16 results (the rescale); bitwise the same results as the avx512 set.
#define GRADCLIP_AVX512_ISA_NS avx512bf16_isa
#define GRADCLIP_AVX512_TABLE_FN avx512bf16_kernels
#define GRADCLIP_AVX512_ISA_NAME "avx512bf16"
#define GRADCLIP_AVX512_NATIVE_BF16 1
#include "cpu/isa_avx512_impl.h"
