// KV cache kernels over the all-layers cache
//
//     kv_cache: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]   (contiguous)
//
// reshape_and_cache: writes one step's new keys and values of one layer into their slots in one launch.
// copy_blocks: copies whole blocks (every layer, K and V) src -> dst for copy-on-write in one launch;
// a block is one contiguous chunk of the cache, so each copy is a flat 16-byte-vectorised memcpy.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "dispatch_utils.h"
#include "kernels.h"

namespace pagedserve {

// Grid: (T); block: min(num_kv_heads * head_size, 512) threads. A negative slot is a padding token.
template <typename scalar_t>
__global__ void reshape_and_cache_kernel(
    const scalar_t* __restrict__ key,        // [T, num_kv_heads, head_size], rows strided by key_stride
    const scalar_t* __restrict__ value,      // [T, num_kv_heads, head_size], rows strided by value_stride
    scalar_t* __restrict__ kv_cache,         // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
    const int64_t* __restrict__ slot_mapping,   // [T]
    int layer, int num_kv_heads, int head_size, int block_size, int64_t key_stride, int64_t key_head_stride,
    int64_t value_stride, int64_t value_head_stride, int64_t block_stride, int64_t layer_stride,
    int64_t kv_stride, int64_t head_stride) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  const int64_t block = slot / block_size;
  const int64_t offset = slot % block_size;
  scalar_t* base = kv_cache + block * block_stride + layer * layer_stride + offset * head_size;
  for (int i = threadIdx.x; i < num_kv_heads * head_size; i += blockDim.x) {
    const int h = i / head_size, d = i % head_size;
    base[h * head_stride + d] = key[token * key_stride + h * key_head_stride + d];
    base[kv_stride + h * head_stride + d] = value[token * value_stride + h * value_head_stride + d];
  }
}

// Grid: (P); block: 256 threads. Copies one whole block (num_layers * 2 * num_kv_heads * block_size *
// head_size elements) per pair, in units of vec_t.
template <typename vec_t>
__global__ void copy_blocks_kernel(
    vec_t* __restrict__ kv_cache,          // [num_blocks, block_vecs] viewed as vectors
    const int64_t* __restrict__ pairs,     // [P, 2]: (src, dst) block ids
    int64_t block_vecs) {
  const int64_t src = pairs[2 * blockIdx.x];
  const int64_t dst = pairs[2 * blockIdx.x + 1];
  const vec_t* from = kv_cache + src * block_vecs;
  vec_t* to = kv_cache + dst * block_vecs;
  for (int64_t i = threadIdx.x; i < block_vecs; i += blockDim.x) to[i] = from[i];
}

// Inputs are checked by the binding (bindings.cpp).
void reshape_and_cache(const at::Tensor& key,            // [T, num_kv_heads, head_size]
                       const at::Tensor& value,          // [T, num_kv_heads, head_size]
                       at::Tensor& kv_cache,             // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                       int64_t layer,
                       const at::Tensor& slot_mapping) { // [T] int64
  const int64_t num_tokens = key.size(0);
  if (num_tokens == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(key.device());
  const int num_kv_heads = static_cast<int>(kv_cache.size(3));
  const int block_size = static_cast<int>(kv_cache.size(4));
  const int head_size = static_cast<int>(kv_cache.size(5));
  const int threads = std::min(num_kv_heads * head_size, 512);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(key.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, key.scalar_type(), "reshape_and_cache", [&] {
    reshape_and_cache_kernel<scalar_t><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
        key.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(),
        slot_mapping.data_ptr<int64_t>(), static_cast<int>(layer), num_kv_heads, head_size, block_size,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), kv_cache.stride(3));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Inputs are checked by the binding (bindings.cpp).
void copy_blocks(at::Tensor& kv_cache,        // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                 const at::Tensor& pairs) {   // [P, 2] int64: (src, dst)
  const int64_t num_pairs = pairs.size(0);
  if (num_pairs == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(kv_cache.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(kv_cache.get_device());
  const int64_t block_bytes = kv_cache.stride(0) * kv_cache.element_size();
  const auto address = reinterpret_cast<uintptr_t>(kv_cache.data_ptr());
  if (block_bytes % 16 == 0 && address % 16 == 0) {
    copy_blocks_kernel<uint4><<<static_cast<unsigned>(num_pairs), 256, 0, stream>>>(
        reinterpret_cast<uint4*>(kv_cache.data_ptr()), pairs.data_ptr<int64_t>(), block_bytes / 16);
  } else {
    copy_blocks_kernel<unsigned char><<<static_cast<unsigned>(num_pairs), 256, 0, stream>>>(
        reinterpret_cast<unsigned char*>(kv_cache.data_ptr()), pairs.data_ptr<int64_t>(), block_bytes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pagedserve
