// Decode PagedAttention: one query token per sequence attends over its cached context, read through a
// block table from the all-layers KV cache
//
//     kv_cache: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]   (contiguous)
//
// One thread block handles one (sequence, kv_head) -- and, in the partitioned variant, one partition of
// PARTITION_SIZE context tokens -- for ALL the query heads of that kv head's GQA group, so each
// [block_size, head_size] K/V tile is read from device memory once per group, not once per query head.
//
// Per KV tile (block_size tokens) the thread block:
//   1. copies the valid rows of the K and V tiles into shared memory with 16-byte loads (rows at
//      positions >= seq_len are never read: they may hold garbage or NaN);
//   2. computes the G x block_size scores, one warp per (head, token) pair, lanes split head_size;
//   3. updates each head's running max / running sum (online softmax, fp32) and rescales its
//      accumulator -- no full row of logits is ever stored, so shared memory does not grow with
//      the context length;
//   4. accumulates p * V into the fp32 accumulator, one thread per (head, dim) element.
//
// The partitioned (split-K) variant runs the same loop over one PARTITION_SIZE slice of the context per
// thread block and writes that slice's max logit, exp-sum and unnormalised output; a reduce kernel
// then merges the partitions. It gives long contexts more parallelism when batch * kv_heads alone
// would leave most SMs idle. The choice is made in `paged_attention_decode` (see the heuristic there).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dispatch_utils.h"

namespace pagedserve {

constexpr int kNumThreads = 128;       // 4 warps per thread block
constexpr int kWarpSize = 32;
constexpr int kPartitionSize = 512;    // tokens per partition of the split-K variant

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__host__ __device__ constexpr int round_up16(int bytes) { return (bytes + 15) / 16 * 16; }

// Shared memory of one thread block, in bytes: fp32 queries and accumulators of the group, the group's
// scores of one tile, per-head softmax state, then one K and one V tile in the cache dtype.
template <typename scalar_t, int HEAD_SIZE, int BLOCK_SIZE>
__host__ __device__ constexpr int shared_bytes_fixed_part() {
  return 2 * round_up16(BLOCK_SIZE * HEAD_SIZE * static_cast<int>(sizeof(scalar_t)));
}
__host__ __device__ inline int shared_bytes_group_part(int group, int head_size, int block_size) {
  return 2 * round_up16(group * head_size * 4)     // q_s, acc_s
         + round_up16(group * block_size * 4)      // p_s
         + 3 * round_up16(group * 4);              // m_s, l_s, alpha_s
}

// Grid: (num_kv_heads, num_seqs, num_partitions); block: kNumThreads; dynamic shared memory as above.
// Not partitioned (PARTITIONED = false): gridDim.z == 1 and the block covers the whole context.
template <typename scalar_t, int HEAD_SIZE, int BLOCK_SIZE, bool PARTITIONED>
__global__ void __launch_bounds__(kNumThreads) paged_attention_decode_kernel(
    scalar_t* __restrict__ out,                  // [S, num_heads, HEAD_SIZE] (unused when PARTITIONED)
    float* __restrict__ exp_sums,                // [S, num_heads, max_partitions] (only when PARTITIONED)
    float* __restrict__ max_logits,              // [S, num_heads, max_partitions] (only when PARTITIONED)
    float* __restrict__ tmp_out,                 // [S, num_heads, max_partitions, HEAD_SIZE] (PARTITIONED)
    const scalar_t* __restrict__ query,          // [S, num_heads, HEAD_SIZE], rows strided by q_stride
    const scalar_t* __restrict__ kv_cache,       // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_SIZE]
    const int* __restrict__ block_tables,        // [S, max_blocks]
    const int* __restrict__ seq_lens,            // [S]
    int layer, int num_heads, int num_kv_heads, int max_blocks, int max_partitions, float scale,
    int64_t q_stride, int64_t block_stride, int64_t layer_stride, int64_t kv_stride, int64_t head_stride) {
  const int kv_head = blockIdx.x;
  const int seq = blockIdx.y;
  const int partition = blockIdx.z;
  const int group = num_heads / num_kv_heads;   // query heads sharing this kv head
  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  constexpr int kNumWarps = kNumThreads / kWarpSize;

  const int seq_len = seq_lens[seq];
  const int ctx_start = PARTITIONED ? partition * kPartitionSize : 0;
  const int ctx_end = PARTITIONED ? min(seq_len, ctx_start + kPartitionSize) : seq_len;
  if (PARTITIONED && ctx_start >= seq_len) return;   // the reduce kernel reads only used partitions

  // Shared memory carve-up; every section starts 16-byte aligned.
  extern __shared__ __align__(16) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem);                                      // [group, HEAD_SIZE]
  float* acc_s = q_s + round_up16(group * HEAD_SIZE * 4) / 4;                       // [group, HEAD_SIZE]
  float* p_s = acc_s + round_up16(group * HEAD_SIZE * 4) / 4;                       // [group, BLOCK_SIZE]
  float* m_s = p_s + round_up16(group * BLOCK_SIZE * 4) / 4;                        // [group]
  float* l_s = m_s + round_up16(group * 4) / 4;                                     // [group]
  float* alpha_s = l_s + round_up16(group * 4) / 4;                                 // [group]
  scalar_t* k_s = reinterpret_cast<scalar_t*>(alpha_s + round_up16(group * 4) / 4); // [BLOCK_SIZE, HEAD_SIZE]
  scalar_t* v_s = k_s + round_up16(BLOCK_SIZE * HEAD_SIZE * sizeof(scalar_t)) / sizeof(scalar_t);

  // The group's queries, pre-scaled, in fp32; zeroed accumulators and softmax state.
  const int first_head = kv_head * group;
  for (int i = tid; i < group * HEAD_SIZE; i += kNumThreads) {
    const int g = i / HEAD_SIZE, d = i % HEAD_SIZE;
    q_s[i] = to_float(query[seq * q_stride + (first_head + g) * HEAD_SIZE + d]) * scale;
    acc_s[i] = 0.f;
  }
  for (int g = tid; g < group; g += kNumThreads) {
    m_s[g] = -INFINITY;
    l_s[g] = 0.f;
  }
  __syncthreads();

  const scalar_t* layer_base = kv_cache + layer * layer_stride + kv_head * head_stride;
  constexpr int kVecElems = 16 / sizeof(scalar_t);   // elements per 16-byte load
  const int first_tile = ctx_start / BLOCK_SIZE;     // kPartitionSize is a multiple of BLOCK_SIZE
  const int last_tile = (ctx_end + BLOCK_SIZE - 1) / BLOCK_SIZE;
  for (int tile = first_tile; tile < last_tile; ++tile) {
    const int tile_start = tile * BLOCK_SIZE;
    const int valid = min(BLOCK_SIZE, ctx_end - tile_start);   // rows of this tile inside the context
    const int64_t block = block_tables[static_cast<int64_t>(seq) * max_blocks + tile];
    const scalar_t* k_tile = layer_base + block * block_stride;
    const scalar_t* v_tile = k_tile + kv_stride;

    // 1. Valid rows of the K and V tiles (contiguous [valid, HEAD_SIZE] each) -> shared memory.
    //    HEAD_SIZE is a multiple of 16, so a row is a whole number of 16-byte vectors.
    const int num_vecs = valid * HEAD_SIZE / kVecElems;
    for (int i = tid; i < num_vecs; i += kNumThreads) {
      reinterpret_cast<uint4*>(k_s)[i] = reinterpret_cast<const uint4*>(k_tile)[i];
      reinterpret_cast<uint4*>(v_s)[i] = reinterpret_cast<const uint4*>(v_tile)[i];
    }
    __syncthreads();

    // 2. Scores: one warp per (head g, token t); lanes split the head dimension.
    for (int pair = warp; pair < group * BLOCK_SIZE; pair += kNumWarps) {
      const int g = pair / BLOCK_SIZE, t = pair % BLOCK_SIZE;
      if (t >= valid) {                 // warp-uniform: the whole warp skips masked tokens
        if (lane == 0) p_s[pair] = -INFINITY;
        continue;
      }
      float dot = 0.f;
#pragma unroll
      for (int d = lane; d < HEAD_SIZE; d += kWarpSize) dot += q_s[g * HEAD_SIZE + d] * to_float(k_s[t * HEAD_SIZE + d]);
      dot = warp_sum(dot);
      if (lane == 0) p_s[pair] = dot;
    }
    __syncthreads();

    // 3. Online softmax per head: new running max, rescale factor, probabilities of this tile.
    for (int g = tid; g < group; g += kNumThreads) {
      float tile_max = -INFINITY;
      for (int t = 0; t < valid; ++t) tile_max = fmaxf(tile_max, p_s[g * BLOCK_SIZE + t]);
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, tile_max);                  // finite: valid >= 1
      const float alpha = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
      float sum = 0.f;
      for (int t = 0; t < valid; ++t) {
        const float p = __expf(p_s[g * BLOCK_SIZE + t] - m_new);
        p_s[g * BLOCK_SIZE + t] = p;
        sum += p;
      }
      m_s[g] = m_new;
      l_s[g] = l_s[g] * alpha + sum;
      alpha_s[g] = alpha;
    }
    __syncthreads();

    // 4. acc = acc * alpha + P @ V, one thread per (head, dim); consecutive threads read consecutive
    //    dims of a V row (no bank conflicts) and the same probability (a broadcast).
    for (int i = tid; i < group * HEAD_SIZE; i += kNumThreads) {
      const int g = i / HEAD_SIZE, d = i % HEAD_SIZE;
      float acc = acc_s[i] * alpha_s[g];
      for (int t = 0; t < valid; ++t) acc += p_s[g * BLOCK_SIZE + t] * to_float(v_s[t * HEAD_SIZE + d]);
      acc_s[i] = acc;
    }
    __syncthreads();   // the next tile overwrites k_s, v_s and p_s
  }

  if constexpr (PARTITIONED) {
    for (int i = tid; i < group * HEAD_SIZE; i += kNumThreads) {
      const int g = i / HEAD_SIZE, d = i % HEAD_SIZE;
      const int64_t row = (static_cast<int64_t>(seq) * num_heads + first_head + g) * max_partitions + partition;
      tmp_out[row * HEAD_SIZE + d] = acc_s[i];
      if (d == 0) {
        max_logits[row] = m_s[g];
        exp_sums[row] = l_s[g];
      }
    }
  } else {
    for (int i = tid; i < group * HEAD_SIZE; i += kNumThreads) {
      const int g = i / HEAD_SIZE, d = i % HEAD_SIZE;
      const float l = l_s[g];
      const float value = l > 0.f ? acc_s[i] / l : 0.f;   // seq_len == 0 gives zeros, not NaN
      out[(static_cast<int64_t>(seq) * num_heads + first_head + g) * HEAD_SIZE + d] = from_float<scalar_t>(value);
    }
  }
}

// Merges the partitions of one (sequence, head): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
// Grid: (num_heads, S); block: kNumThreads.
template <typename scalar_t, int HEAD_SIZE>
__global__ void __launch_bounds__(kNumThreads) paged_attention_reduce_kernel(
    scalar_t* __restrict__ out,                  // [S, num_heads, HEAD_SIZE]
    const float* __restrict__ exp_sums,          // [S, num_heads, max_partitions]
    const float* __restrict__ max_logits,        // [S, num_heads, max_partitions]
    const float* __restrict__ tmp_out,           // [S, num_heads, max_partitions, HEAD_SIZE]
    const int* __restrict__ seq_lens,            // [S]
    int num_heads, int max_partitions) {
  const int head = blockIdx.x;
  const int seq = blockIdx.y;
  const int num_partitions = (seq_lens[seq] + kPartitionSize - 1) / kPartitionSize;
  const int64_t row = (static_cast<int64_t>(seq) * num_heads + head) * max_partitions;
  // A handful of partitions: each thread scans them itself rather than synchronising on a reduction.
  float global_max = -INFINITY;
  for (int p = 0; p < num_partitions; ++p) global_max = fmaxf(global_max, max_logits[row + p]);
  float denom = 0.f;
  for (int p = 0; p < num_partitions; ++p) denom += __expf(max_logits[row + p] - global_max) * exp_sums[row + p];
  const float inv_denom = denom > 0.f ? 1.f / denom : 0.f;
  for (int d = threadIdx.x; d < HEAD_SIZE; d += kNumThreads) {
    float acc = 0.f;
    for (int p = 0; p < num_partitions; ++p) {
      acc += __expf(max_logits[row + p] - global_max) * tmp_out[(row + p) * HEAD_SIZE + d];
    }
    out[(static_cast<int64_t>(seq) * num_heads + head) * HEAD_SIZE + d] = from_float<scalar_t>(acc * inv_denom);
  }
}

template <typename scalar_t, int HEAD_SIZE, int BLOCK_SIZE>
void launch_decode(at::Tensor& out,               // [S, num_heads, HEAD_SIZE]
                   const at::Tensor& query,       // [S, num_heads, HEAD_SIZE]
                   const at::Tensor& kv_cache,    // [num_blocks, num_layers, 2, num_kv_heads, BLOCK_SIZE, HEAD_SIZE]
                   int64_t layer,
                   const at::Tensor& block_tables,   // [S, max_blocks] int32
                   const at::Tensor& seq_lens,       // [S] int32
                   double scale, bool partitioned, int64_t max_seq_len) {
  const int num_seqs = static_cast<int>(query.size(0));
  const int num_heads = static_cast<int>(query.size(1));
  const int num_kv_heads = static_cast<int>(kv_cache.size(3));
  const int group = num_heads / num_kv_heads;
  const int max_blocks = static_cast<int>(block_tables.size(1));
  const int smem = shared_bytes_fixed_part<scalar_t, HEAD_SIZE, BLOCK_SIZE>() +
                   shared_bytes_group_part(group, HEAD_SIZE, BLOCK_SIZE);
  const int device = query.get_device();
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= smem_limit, "paged_attention_decode: a GQA group of ", group, " heads of size ", HEAD_SIZE,
              " needs ", smem, " bytes of shared memory; this GPU allows ", smem_limit);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  const int num_partitions = partitioned ? static_cast<int>((max_seq_len + kPartitionSize - 1) / kPartitionSize) : 1;
  const dim3 grid(num_kv_heads, num_seqs, std::max(num_partitions, 1));
  const int64_t q_stride = query.stride(0);

  using cuda_t = typename CudaType<scalar_t>::type;
  auto* out_ptr = reinterpret_cast<cuda_t*>(out.data_ptr());
  const auto* q_ptr = reinterpret_cast<const cuda_t*>(query.data_ptr());
  const auto* kv_ptr = reinterpret_cast<const cuda_t*>(kv_cache.data_ptr());
  const int* table_ptr = block_tables.data_ptr<int>();
  const int* len_ptr = seq_lens.data_ptr<int>();
  const auto fscale = static_cast<float>(scale);
  const int layer_i = static_cast<int>(layer);

  if (!partitioned) {
    auto kernel = paged_attention_decode_kernel<cuda_t, HEAD_SIZE, BLOCK_SIZE, false>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<grid, kNumThreads, smem, stream>>>(
        out_ptr, nullptr, nullptr, nullptr, q_ptr, kv_ptr, table_ptr, len_ptr, layer_i, num_heads, num_kv_heads,
        max_blocks, 1, fscale, q_stride, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto float_opts = query.options().dtype(at::kFloat);
  at::Tensor exp_sums = at::empty({num_seqs, num_heads, num_partitions}, float_opts);     // [S, H, P]
  at::Tensor max_logits = at::empty({num_seqs, num_heads, num_partitions}, float_opts);   // [S, H, P]
  at::Tensor tmp_out = at::empty({num_seqs, num_heads, num_partitions, HEAD_SIZE}, float_opts);  // [S, H, P, D]
  auto kernel = paged_attention_decode_kernel<cuda_t, HEAD_SIZE, BLOCK_SIZE, true>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kNumThreads, smem, stream>>>(
      out_ptr, exp_sums.data_ptr<float>(), max_logits.data_ptr<float>(), tmp_out.data_ptr<float>(), q_ptr,
      kv_ptr, table_ptr, len_ptr, layer_i, num_heads, num_kv_heads, max_blocks, num_partitions, fscale, q_stride,
      kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  paged_attention_reduce_kernel<cuda_t, HEAD_SIZE><<<dim3(num_heads, num_seqs), kNumThreads, 0, stream>>>(
      out_ptr, exp_sums.data_ptr<float>(), max_logits.data_ptr<float>(), tmp_out.data_ptr<float>(), len_ptr,
      num_heads, num_partitions);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int HEAD_SIZE>
void dispatch_block_size(at::Tensor& out,              // [S, num_heads, HEAD_SIZE]
                         const at::Tensor& query,      // [S, num_heads, HEAD_SIZE]
                         const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, HEAD_SIZE]
                         int64_t layer,
                         const at::Tensor& block_tables,   // [S, max_blocks] int32
                         const at::Tensor& seq_lens,       // [S] int32
                         double scale, bool partitioned, int64_t max_seq_len) {
  const int64_t block_size = kv_cache.size(4);
  switch (block_size) {
#define PAGEDSERVE_BLOCK_CASE(BS)                                                                               \
  case BS:                                                                                                     \
    launch_decode<scalar_t, HEAD_SIZE, BS>(out, query, kv_cache, layer, block_tables, seq_lens, scale, partitioned, \
                                           max_seq_len);                                                       \
    break;
    PAGEDSERVE_BLOCK_CASE(8)
    PAGEDSERVE_BLOCK_CASE(16)
    PAGEDSERVE_BLOCK_CASE(32)
#undef PAGEDSERVE_BLOCK_CASE
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported block size ", block_size,
                  " (supported: 8, 16, 32)");
  }
}

template <typename scalar_t>
void dispatch_head_size(at::Tensor& out,              // [S, num_heads, head_size]
                        const at::Tensor& query,      // [S, num_heads, head_size]
                        const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                        int64_t layer,
                        const at::Tensor& block_tables,   // [S, max_blocks] int32
                        const at::Tensor& seq_lens,       // [S] int32
                        double scale, bool partitioned, int64_t max_seq_len) {
  const int64_t head_size = query.size(2);
  switch (head_size) {
#define PAGEDSERVE_HEAD_CASE(D)                                                                                 \
  case D:                                                                                                      \
    dispatch_block_size<scalar_t, D>(out, query, kv_cache, layer, block_tables, seq_lens, scale, partitioned,     \
                                     max_seq_len);                                                             \
    break;
    PAGEDSERVE_HEAD_CASE(64)
    PAGEDSERVE_HEAD_CASE(80)
    PAGEDSERVE_HEAD_CASE(96)
    PAGEDSERVE_HEAD_CASE(128)
    PAGEDSERVE_HEAD_CASE(256)
#undef PAGEDSERVE_HEAD_CASE
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported head size ", head_size,
                  " (supported: 64, 80, 96, 128, 256)");
  }
}

// Heuristic (a first guess; a measured one comes later): split the context into kPartitionSize-token
// partitions when the longest context exceeds two partitions AND the unsplit grid (S * num_kv_heads
// thread blocks) would not give every SM at least two blocks -- then the extra parallelism of the
// partitions pays for the reduce kernel and the fp32 round trip through device memory.
bool use_partitions(int64_t num_seqs, int64_t num_kv_heads, int64_t max_seq_len, int device) {
  if (max_seq_len <= 2 * kPartitionSize) return false;
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  return num_seqs * num_kv_heads < 2 * static_cast<int64_t>(num_sms);
}

// partition_mode: -1 chooses with `use_partitions`, 0 never partitions, 1 always partitions (tests).
// Inputs are checked by the binding (bindings.cpp). The grid has ceil(max_seq_len / kPartitionSize)
// partitions, so max_seq_len must be >= every seq_lens entry.
void paged_attention_decode(at::Tensor& out,              // [S, num_heads, head_size]
                            const at::Tensor& query,      // [S, num_heads, head_size]
                            const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                            int64_t layer,
                            const at::Tensor& block_tables,   // [S, max_blocks] int32
                            const at::Tensor& seq_lens,       // [S] int32
                            double scale, int64_t max_seq_len, int64_t partition_mode) {
  if (query.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const bool partitioned =
      partition_mode == 1 ||
      (partition_mode == -1 && use_partitions(query.size(0), kv_cache.size(3), max_seq_len, query.get_device()));
  switch (query.scalar_type()) {
    case at::kHalf:
      dispatch_head_size<at::Half>(out, query, kv_cache, layer, block_tables, seq_lens, scale, partitioned, max_seq_len);
      break;
    case at::kBFloat16:
      dispatch_head_size<at::BFloat16>(out, query, kv_cache, layer, block_tables, seq_lens, scale, partitioned,
                                       max_seq_len);
      break;
    case at::kFloat:
      dispatch_head_size<float>(out, query, kv_cache, layer, block_tables, seq_lens, scale, partitioned, max_seq_len);
      break;
    default:
      TORCH_CHECK(false, "paged_attention_decode: unsupported dtype ", query.scalar_type(),
                  " (supported: float16, bfloat16, float32)");
  }
}

}  // namespace pagedserve
