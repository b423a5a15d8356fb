// Shared helpers of the CUDA sources: the CUDA-native type of each ATen scalar type.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pagedserve {

// ATen's Half/BFloat16 have the same bits as CUDA's __half/__nv_bfloat16; kernels use the CUDA types so
// they get the hardware conversions, and the host code reinterprets data pointers accordingly.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace pagedserve
