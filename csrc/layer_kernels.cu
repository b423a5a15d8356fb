// Fused elementwise layers of the Llama family: RMSNorm (alone and after the residual add), SwiGLU's
// silu(gate) * up, and the neox-style rotary embedding applied in place.
//
// Each replaces a chain of separate torch kernels (RMSNorm alone is seven: cast, square, mean, add,
// rsqrt, multiply, cast, weight multiply), every one a full read and write of the activations. In a
// decode step of a 7B model these chains were about 15% of the GPU time.
//
// Rounding follows the torch reference (executor_svc/models/layers.py) step for step: where torch
// rounds an fp16/bf16 intermediate (it computes each elementwise op in float and rounds the result to the
// tensor's dtype), the kernel rounds it too. Only reductions and transcendental functions may differ in
// the last bit.
//
// Shapes: N rows (tokens), H hidden size, I intermediate size, Hq query heads, Hkv kv heads, D head
// size, R rotary dim (<= D, even), P positions in the rotary table.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "dispatch_utils.h"
#include "kernels.h"

namespace pagedserve {

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;

// `x` rounded to T and back: the value torch stores for an fp16/bf16 intermediate.
template <typename T>
__device__ __forceinline__ float rounded(float x) {
  return to_float(from_float<T>(x));
}

// N elements loaded or stored as one access (16 bytes for N = 8 halves).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The sum of `value` over the thread block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result.
__device__ float block_sum(float value) {
  __shared__ float partial[kMaxThreads / kWarpSize];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  const int num_warps = blockDim.x / kWarpSize;
  value = lane < num_warps ? partial[lane] : 0.0f;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  return value;
}

// Grid: (N); block: a multiple of 32 threads. One row per thread block, in packs of VEC elements.
// With kAddResidual, residual <- input + residual (rounded, as torch's add) and the sum is normalised;
// else the input is. out = weight * (x * rsqrt(mean(x^2) + eps) rounded to T), rounded: HF's order.
template <typename T, int VEC, bool kAddResidual>
__global__ void rms_norm_kernel(
    T* __restrict__ out,              // [N, H] contiguous
    const T* __restrict__ input,      // [N, H], rows strided by input_stride
    T* __restrict__ residual,         // [N, H] contiguous (kAddResidual only; updated in place)
    const T* __restrict__ weight,     // [H]
    int64_t input_stride, int hidden, float eps) {
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.x;
  const int packs = hidden / VEC;
  const P* in_row = reinterpret_cast<const P*>(input + row * input_stride);
  P* res_row = kAddResidual ? reinterpret_cast<P*>(residual + row * hidden) : nullptr;
  float squares = 0.0f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    P x = in_row[i];
    if constexpr (kAddResidual) {
      const P r = res_row[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) x.v[j] = from_float<T>(to_float(x.v[j]) + to_float(r.v[j]));
      res_row[i] = x;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += to_float(x.v[j]) * to_float(x.v[j]);
  }
  const float inv_rms = rsqrtf(block_sum(squares) / static_cast<float>(hidden) + eps);
  // The second pass re-reads the row this thread wrote or read (its own packs), from L1/L2.
  const P* src = kAddResidual ? reinterpret_cast<const P*>(res_row) : in_row;
  const P* w = reinterpret_cast<const P*>(weight);
  P* dst = reinterpret_cast<P*>(out + row * hidden);
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    const P x = src[i], g = w[i];
    P y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y.v[j] = from_float<T>(rounded<T>(to_float(x.v[j]) * inv_rms) * to_float(g.v[j]));
    }
    dst[i] = y;
  }
}

// Grid: (N, ceil(I / (VEC * blockDim.x))); out = silu(gate) * up with silu rounded to T first (torch
// computes F.silu(gate) as its own op).
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(
    T* __restrict__ out,              // [N, I] contiguous
    const T* __restrict__ input,      // [N, 2 * I], rows strided by input_stride: [gate | up]
    int64_t input_stride, int intermediate) {
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.x;
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= intermediate / VEC) return;
  const P g = reinterpret_cast<const P*>(input + row * input_stride)[i];
  const P u = reinterpret_cast<const P*>(input + row * input_stride + intermediate)[i];
  P y;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const float x = to_float(g.v[j]);
    y.v[j] = from_float<T>(rounded<T>(x / (1.0f + __expf(-x))) * to_float(u.v[j]));
  }
  reinterpret_cast<P*>(out + row * intermediate)[i] = y;
}

// Grid: (N); block: min(1024, (Hq + Hkv) * R / 2) rounded up to a warp. Neox style: feature j < R / 2
// pairs with j + R / 2; features R..D-1 pass through. cos and sin are rounded to T first and every
// product and sum is rounded, as torch computes x1 * cos - x2 * sin in T. A position outside the table
// leaves its row unrotated (plan validation keeps positions below max_model_len, the table's size).
template <typename T>
__global__ void rotary_embedding_kernel(
    const int64_t* __restrict__ positions,   // [N]
    T* __restrict__ query,                   // [N, Hq, D], rows strided by query_stride, heads by D
    T* __restrict__ key,                     // [N, Hkv, D], rows strided by key_stride, heads by D
    const float* __restrict__ cos_sin,       // [P, R]: cos of the R / 2 frequencies, then sin
    int64_t query_stride, int64_t key_stride, int num_heads, int num_kv_heads, int head_size,
    int rotary_dim, int64_t num_positions) {
  const int64_t token = blockIdx.x;
  const int64_t position = positions[token];
  if (position < 0 || position >= num_positions) return;
  const int half = rotary_dim / 2;
  const float* cos = cos_sin + position * rotary_dim;
  const float* sin = cos + half;
  for (int i = threadIdx.x; i < (num_heads + num_kv_heads) * half; i += blockDim.x) {
    const int head = i / half, j = i % half;
    T* x = head < num_heads ? query + token * query_stride + head * head_size
                            : key + token * key_stride + (head - num_heads) * head_size;
    const float c = rounded<T>(cos[j]), s = rounded<T>(sin[j]);
    const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
    x[j] = from_float<T>(rounded<T>(x1 * c) - rounded<T>(x2 * s));
    x[j + half] = from_float<T>(rounded<T>(x2 * c) + rounded<T>(x1 * s));
  }
}

// A warp multiple, at least one warp, at most kMaxThreads, enough for `work` items.
int threads_for(int64_t work) {
  const int64_t warps = (std::min<int64_t>(work, kMaxThreads) + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::max<int64_t>(warps, 1) * kWarpSize);
}

// Whether rows of `hidden` elements, at these addresses and row strides, can move in packs of 8.
bool packs_of_8(int64_t hidden, std::initializer_list<const at::Tensor*> tensors,
                std::initializer_list<int64_t> strides) {
  if (hidden % 8 != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  }
  for (int64_t stride : strides) {
    if (stride % 8 != 0) return false;
  }
  return true;
}

template <typename scalar_t, int VEC, bool kAddResidual>
void launch_rms_norm(at::Tensor& out,            // [N, H] contiguous
                     const at::Tensor& input,    // [N, H], last dim contiguous
                     at::Tensor* residual,       // [N, H] contiguous, or null
                     const at::Tensor& weight,   // [H]
                     double eps, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const int64_t rows = input.size(0);
  const int hidden = static_cast<int>(input.size(1));
  rms_norm_kernel<T, VEC, kAddResidual><<<static_cast<unsigned>(rows), threads_for(hidden / VEC), 0, stream>>>(
      reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(input.data_ptr()),
      residual ? reinterpret_cast<T*>(residual->data_ptr()) : nullptr, reinterpret_cast<const T*>(weight.data_ptr()),
      input.stride(0), hidden, static_cast<float>(eps));
}

template <bool kAddResidual>
void rms_norm_dispatch(at::Tensor& out,            // [N, H] contiguous
                       const at::Tensor& input,    // [N, H], last dim contiguous
                       at::Tensor* residual,       // [N, H] contiguous, or null
                       const at::Tensor& weight,   // [H]
                       double eps) {
  if (input.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  const bool vectorised = residual ? packs_of_8(input.size(1), {&out, &input, residual, &weight}, {input.stride(0)})
                                   : packs_of_8(input.size(1), {&out, &input, &weight}, {input.stride(0)});
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "rms_norm", [&] {
    if (vectorised) {
      launch_rms_norm<scalar_t, 8, kAddResidual>(out, input, residual, weight, eps, stream);
    } else {
      launch_rms_norm<scalar_t, 1, kAddResidual>(out, input, residual, weight, eps, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_silu_and_mul(at::Tensor& out,            // [N, I] contiguous
                         const at::Tensor& input,    // [N, 2 * I], last dim contiguous
                         cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const int64_t rows = input.size(0);
  const int intermediate = static_cast<int>(out.size(1));
  const int packs = intermediate / VEC;
  const int threads = threads_for(packs);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>((packs + threads - 1) / threads));
  silu_and_mul_kernel<T, VEC><<<grid, threads, 0, stream>>>(
      reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(input.data_ptr()), input.stride(0),
      intermediate);
}

}  // namespace

// Inputs are checked by the binding (bindings.cpp).
void rms_norm(at::Tensor& out,            // [N, H] contiguous
              const at::Tensor& input,    // [N, H], last dim contiguous
              const at::Tensor& weight,   // [H]
              double eps) {
  rms_norm_dispatch<false>(out, input, nullptr, weight, eps);
}

// Inputs are checked by the binding (bindings.cpp).
void fused_add_rms_norm(at::Tensor& out,            // [N, H] contiguous
                        const at::Tensor& input,    // [N, H], last dim contiguous
                        at::Tensor& residual,       // [N, H] contiguous, becomes input + residual
                        const at::Tensor& weight,   // [H]
                        double eps) {
  rms_norm_dispatch<true>(out, input, &residual, weight, eps);
}

// Inputs are checked by the binding (bindings.cpp).
void silu_and_mul(at::Tensor& out,            // [N, I] contiguous
                  const at::Tensor& input) {  // [N, 2 * I], last dim contiguous
  if (input.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  const bool vectorised = packs_of_8(out.size(1), {&out, &input}, {input.stride(0)});
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "silu_and_mul", [&] {
    if (vectorised) {
      launch_silu_and_mul<scalar_t, 8>(out, input, stream);
    } else {
      launch_silu_and_mul<scalar_t, 1>(out, input, stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Inputs are checked by the binding (bindings.cpp).
void rotary_embedding(const at::Tensor& positions,   // [N] int64
                      at::Tensor& query,             // [N, Hq, D], heads contiguous; rotated in place
                      at::Tensor& key,               // [N, Hkv, D], heads contiguous; rotated in place
                      const at::Tensor& cos_sin,     // [P, R] float32 contiguous
                      int64_t rotary_dim) {
  const int64_t tokens = query.size(0);
  if (tokens == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(query.get_device());
  const int num_heads = static_cast<int>(query.size(1)), num_kv_heads = static_cast<int>(key.size(1));
  const int threads = threads_for((num_heads + num_kv_heads) * rotary_dim / 2);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(query.scalar_type(), "rotary_embedding", [&] {
    using T = typename CudaType<scalar_t>::type;
    rotary_embedding_kernel<T><<<static_cast<unsigned>(tokens), threads, 0, stream>>>(
        positions.data_ptr<int64_t>(), reinterpret_cast<T*>(query.data_ptr()), reinterpret_cast<T*>(key.data_ptr()),
        cos_sin.data_ptr<float>(), query.stride(0), key.stride(0), num_heads, num_kv_heads,
        static_cast<int>(query.size(2)), static_cast<int>(rotary_dim), cos_sin.size(0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pagedserve
