// The sampler's race noise in one pass (executor_svc/sampler.py `uniform_noise`).
//
// A seeded row's draw is argmax over token ids of p / E, E = -log(1 - x), where x in (0, 1) is a hash
// of the row's 64-bit draw key and the token id:
//
//     h = fmix32(fmix32(id ^ key_lo) ^ key_hi),   x = (float(h) + 0.5) * 2^-32
//
// (murmur3's fmix32 on 32-bit words). In torch that is about a dozen int64 passes over the [R, K] ids;
// here it is one pass writing x. The result is bit for bit torch's: every integer step is exact in
// uint32, the conversion rounds to nearest as torch's int64 -> float32 does, and the add and the
// (exact, power-of-two) scale use the _rn intrinsics, which --use_fast_math never contracts or
// approximates.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace pagedserve {

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Grid: (ceil(K / threads) capped, R); block: 256 threads, a grid-stride loop over the row's K ids.
__global__ void race_uniform_noise_kernel(float* __restrict__ out,             // [R, K]
                                          const int64_t* __restrict__ ids,     // [R, K], or [1, K] shared
                                          const int64_t* __restrict__ key_lo,  // [R], low 32 bits of each key
                                          const int64_t* __restrict__ key_hi,  // [R], high 32 bits
                                          int64_t num_ids, int64_t ids_row_stride) {  // 0 when ids is shared
  const int64_t row = blockIdx.y;
  const uint32_t lo = static_cast<uint32_t>(key_lo[row]);
  const uint32_t hi = static_cast<uint32_t>(key_hi[row]);
  const int64_t* row_ids = ids + row * ids_row_stride;
  float* row_out = out + row * num_ids;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < num_ids;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = fmix32(fmix32(static_cast<uint32_t>(row_ids[k]) ^ lo) ^ hi);
    row_out[k] = __fmul_rn(__fadd_rn(__uint2float_rn(h), 0.5f), 2.3283064365386963e-10f);   // 2^-32
  }
}

// Inputs are checked by the binding (bindings.cpp).
void race_uniform_noise(at::Tensor& out,              // [R, K] float32
                        const at::Tensor& ids,        // [R, K] or [1, K] int64
                        const at::Tensor& key_lo,     // [R] int64
                        const at::Tensor& key_hi) {   // [R] int64
  const int64_t rows = out.size(0), num_ids = out.size(1);
  if (rows == 0 || num_ids == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.get_device());
  constexpr int kThreads = 256;
  const int64_t blocks_per_row = std::min<int64_t>((num_ids + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(blocks_per_row), static_cast<unsigned>(rows));
  race_uniform_noise_kernel<<<grid, kThreads, 0, stream>>>(
      out.data_ptr<float>(), ids.data_ptr<int64_t>(), key_lo.data_ptr<int64_t>(), key_hi.data_ptr<int64_t>(),
      num_ids, ids.size(0) == 1 ? 0 : ids.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pagedserve
