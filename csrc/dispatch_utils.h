// Shared helpers of the CUDA sources: the CUDA-native type of each ATen scalar type, and float
// conversions of the half types (round to nearest even, as torch rounds).
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

#ifdef __CUDACC__
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

}  // namespace pagedserve
