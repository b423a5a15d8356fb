// PagedAttention over block tables, on tensor cores: decode (one query token per sequence) and prefill
// over paged context (a chunk of new tokens after cached ones), in one kernel.
//
//     kv_cache: [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]   (contiguous)
//
// Work decomposition. The rows of one thread block are (query token, query head) pairs of ONE sequence
// and ONE kv head: the G query heads of a GQA group for as many query tokens as fit in kRows = 16 rows
// (decode: the group's heads of the single new token; prefill: 16 / G tokens x G heads). Every K/V tile
// a thread block reads therefore serves the whole group, so a K/V block is loaded once per kv-head
// group, not once per query head (groups larger than 16 heads take ceil(G / 16) thread blocks).
//
// The context is cut into sub-tiles of kTileTokens = 16 tokens; the 4 warps of a thread block take
// sub-tiles round-robin and each runs its own pipeline:
//   1. cp.async copies the next sub-tiles' K and V rows (16-byte chunks, found through the block table,
//      so any block size works) into the warp's other shared-memory stages while it computes on one
//      -- rows past the context are zero-filled, never read;
//   2. S = Q K^T with mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate), fragments via ldmatrix;
//   3. causal / length mask, online softmax in the log2 domain (fp32, registers only);
//   4. O += P V with mma.sync, P re-packed from the S accumulators, V fragments via ldmatrix.trans.
// At the end the 4 warps' (max, sum, O) are merged through shared memory.
//
// Split-K: with few thread blocks (small batch x kv heads) and long contexts, the context is also cut
// into partitions, one thread block each; partitions write their unnormalised O,
// max logit and exp-sum and a reduce kernel merges them. `choose_partitions` decides (heuristic in it).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>

#include "dispatch_utils.h"
#include "kernels.h"

namespace pagedserve {

constexpr int kWarpSize = 32;
constexpr int kNumWarps = 4;
constexpr int kNumThreads = kNumWarps * kWarpSize;
constexpr int kRows = 16;              // mma M: (query token, head) rows per thread block
constexpr int kTileTokens = 16;        // context tokens per warp step (two n8 tiles of S, one k16 of PV)
// Shared-memory stages per warp: one computed on while kStages - 1 sub-tiles are in flight. Decode is
// latency-bound per warp (one sub-tile in flight gave ~2.8 us per step on an H200), so bytes in flight
// per SM decide the bandwidth; 3 stages x 4 warps x 2 thread blocks per SM keep 16 sub-tiles in flight.
constexpr int kStages = 3;
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ uint32_t smem_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane i gives the address of row (i % 8) of matrix (i / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// D[16x8] += A[16x16] B[16x8], fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two b16 values (the first in the low half, as mma fragments expect).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------------
// Geometry shared by the host launcher and the kernel.

// Query rows of one thread block: `heads` heads (of one GQA group) for `tokens` query tokens.
struct RowTiling {
  int heads;          // min(G, kRows)
  int tokens;         // kRows / heads query tokens per thread block
  int head_tiles;     // ceil(G / kRows) thread blocks per (kv head, token tile)
};

__host__ __device__ inline RowTiling row_tiling(int group) {
  const int heads = group < kRows ? group : kRows;
  return RowTiling{heads, kRows / heads, (group + kRows - 1) / kRows};
}

// Shared memory of one thread block, in bytes: the Q tile, then per warp kStages stages of (K, V) sub-tiles
// (later reused for the warp's partial O), then per-warp softmax state. Rows are padded by 16 bytes
// so the 8 row addresses of an ldmatrix fall in 8 different bank groups.
template <typename T, int HEAD_SIZE>
struct SharedLayout {
  static constexpr int kRowElems = HEAD_SIZE + 8;
  static constexpr int kTileElems = kTileTokens * kRowElems;             // one K or V sub-tile
  static constexpr int kQBytes = kRows * kRowElems * static_cast<int>(sizeof(T));
  static constexpr int kWarpBytes = kStages * 2 * kTileElems * static_cast<int>(sizeof(T));   // stages x (K, V)
  static constexpr int kStateBytes = 2 * kNumWarps * kRows * 4;                         // max, sum
  static constexpr int kTotal = kQBytes + kNumWarps * kWarpBytes + kStateBytes;
  static_assert(kRows * HEAD_SIZE * 4 <= kWarpBytes, "a warp's partial O must fit in its staging area");
  static_assert(kQBytes % 16 == 0 && kWarpBytes % 16 == 0, "sections must stay 16-byte aligned");
};

// Which sequence (and which of its query tokens) the thread block `tile` covers. Decode maps tile i to
// sequence i. Prefill tiles are numbered sequence after sequence, ceil(q_len / tokens) per sequence;
// one warp scans query_start_loc 32 sequences at a time with a prefix sum. Returns false past the end.
__device__ inline bool locate_tile(int tile,
                                   const int* __restrict__ query_start_loc,   // [num_seqs + 1] or nullptr
                                   int num_seqs, int tokens_per_tile, int& seq, int& first_token) {
  if (query_start_loc == nullptr) {
    seq = tile;
    first_token = 0;
    return tile < num_seqs;
  }
  const int lane = threadIdx.x % kWarpSize;
  int tiles_before = 0;
  for (int base = 0; base < num_seqs; base += kWarpSize) {
    const int s = base + lane;
    const int q_len = s < num_seqs ? query_start_loc[s + 1] - query_start_loc[s] : 0;
    const int count = (q_len + tokens_per_tile - 1) / tokens_per_tile;
    int inclusive = count;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    const int local = tile - tiles_before;
    const unsigned hit = __ballot_sync(0xffffffffu, local < inclusive && local >= inclusive - count && count > 0);
    if (hit != 0) {
      const int owner = __ffs(hit) - 1;
      seq = base + owner;
      first_token = (local - __shfl_sync(0xffffffffu, inclusive - count, owner)) * tokens_per_tile;
      return true;
    }
    tiles_before += __shfl_sync(0xffffffffu, inclusive, kWarpSize - 1);
  }
  return false;
}

// ---------------------------------------------------------------------------------------------------
// The attention kernel.
//
// Grid: (row tiles, num_kv_heads * head_tiles, partitions); block: kNumThreads; dynamic shared memory
// SharedLayout<T, HEAD_SIZE>::kTotal. Not partitioned: gridDim.z == 1, one thread block per row tile
// covers the whole context and writes `out`; partitioned: writes tmp_out / max_logits / exp_sums.
template <typename T, int HEAD_SIZE, bool PARTITIONED>
__global__ void __launch_bounds__(kNumThreads) paged_attention_kernel(
    T* __restrict__ out,                       // [num_tokens, num_heads, HEAD_SIZE] (not PARTITIONED)
    float* __restrict__ exp_sums,              // [num_tokens, num_heads, partitions] (PARTITIONED)
    float* __restrict__ max_logits,            // [num_tokens, num_heads, partitions], log2 domain (PARTITIONED)
    float* __restrict__ tmp_out,               // [num_tokens, num_heads, partitions, HEAD_SIZE] (PARTITIONED)
    const T* __restrict__ query,               // [num_tokens, num_heads, HEAD_SIZE], rows strided by q_stride
    const T* __restrict__ kv_cache,            // [num_blocks, num_layers, 2, num_kv_heads, block_size, HEAD_SIZE]
    const int* __restrict__ block_tables,      // [num_seqs, max_blocks]
    const int* __restrict__ seq_lens,          // [num_seqs]: context length including the new tokens
    const int* __restrict__ query_start_loc,   // [num_seqs + 1] token offsets; nullptr = decode (1 per seq)
    int num_seqs, int layer, int num_heads, int num_kv_heads, int block_size, int max_blocks, int partitions,
    int partition_size, float scale_log2, int64_t q_stride, int64_t block_stride, int64_t layer_stride, int64_t kv_stride,
    int64_t head_stride) {
  using Layout = SharedLayout<T, HEAD_SIZE>;
  constexpr int kRowElems = Layout::kRowElems;
  constexpr int kChunksPerRow = HEAD_SIZE / 8;                       // 16-byte chunks per K/V row
  constexpr int kChunksPerLane = kTileTokens * kChunksPerRow / kWarpSize;
  constexpr int kKSteps = HEAD_SIZE / 16;                            // k16 steps of S = Q K^T
  constexpr int kNTiles = HEAD_SIZE / 8;                             // n8 tiles of O

  const int group = num_heads / num_kv_heads;
  const RowTiling tiling = row_tiling(group);
  const int kv_head = blockIdx.y / tiling.head_tiles;
  const int first_head = kv_head * group + (blockIdx.y % tiling.head_tiles) * kRows;   // query head of row 0
  const int heads_here = min(tiling.heads, kv_head * group + group - first_head);
  const int partition = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;

  int seq, first_token;
  if (!locate_tile(blockIdx.x, query_start_loc, num_seqs, tiling.tokens, seq, first_token)) return;
  const int token_base = query_start_loc == nullptr ? seq : query_start_loc[seq];   // flat index of token 0
  const int q_len = query_start_loc == nullptr ? 1 : query_start_loc[seq + 1] - token_base;
  const int seq_len = seq_lens[seq];
  const int tokens_here = min(tiling.tokens, q_len - first_token);
  // Query token j of the sequence sits at position seq_len - q_len + j and sees keys up to it.
  const int last_position = seq_len - q_len + first_token + tokens_here - 1;
  const int range_start = PARTITIONED ? partition * partition_size : 0;
  const int range_end = PARTITIONED ? min(last_position + 1, range_start + partition_size) : last_position + 1;

  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);                                                  // [kRows, kRowElems]
  T* warp_s = reinterpret_cast<T*>(smem + Layout::kQBytes + warp * Layout::kWarpBytes);  // kStages x [K, V]
  float* max_s = reinterpret_cast<float*>(smem + Layout::kQBytes + kNumWarps * Layout::kWarpBytes);  // [warps, rows]
  float* sum_s = max_s + kNumWarps * kRows;                                                          // [warps, rows]

  // Row r of the tile is (query token first_token + r / heads, query head first_head + r % heads).
  auto row_valid = [&](int r) { return r / tiling.heads < tokens_here && r % tiling.heads < heads_here; };

  // The Q tile -> shared memory (zeros in padding rows), 16 bytes per thread per step.
  for (int i = tid; i < kRows * kChunksPerRow; i += kNumThreads) {
    const int r = i / kChunksPerRow, c = i % kChunksPerRow;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row_valid(r)) {
      const int64_t token = token_base + first_token + r / tiling.heads;
      v = *reinterpret_cast<const uint4*>(query + token * q_stride + (first_head + r % tiling.heads) * HEAD_SIZE +
                                          c * 8);
    }
    *reinterpret_cast<uint4*>(q_s + r * kRowElems + c * 8) = v;
  }
  __syncthreads();

  // This thread's two accumulator rows (mma C layout: rows lane / 4 and lane / 4 + 8) and how far into
  // the context each may look: its causal limit inside [range_start, range_end); padding rows see nothing.
  const int row0 = lane / 4, row1 = row0 + 8;
  auto row_limit = [&](int r) {
    if (!row_valid(r)) return range_start;
    return min(range_end, seq_len - q_len + first_token + r / tiling.heads + 1);
  };
  const int limit0 = row_limit(row0), limit1 = row_limit(row1);

  float o[kNTiles][4];
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;   // running max (log2) and this lane's sum part

  const T* layer_base = kv_cache + layer * layer_stride + kv_head * head_stride;
  const int* table = block_tables + static_cast<int64_t>(seq) * max_blocks;
  const int num_subtiles = range_end > range_start ? (range_end - range_start + kTileTokens - 1) / kTileTokens : 0;

  // The block ids of sub-tile `st`, one per token: lane t < kTileTokens holds token t's block. Fetched one
  // sub-tile ahead of its copies, so the table read's latency hides behind a sub-tile of compute instead
  // of delaying the copies that depend on it.
  auto fetch_blocks = [&](int st) -> int {
    const int position = range_start + st * kTileTokens + lane;
    return (st < num_subtiles && lane < kTileTokens && position < range_end) ? table[position / block_size] : 0;
  };
  // Issue the copies of sub-tile `st` into stage `stage` of this warp (a no-op past the warp's last);
  // `blocks` is fetch_blocks(st). Every lane runs the shuffles, so it is called warp-uniformly.
  auto load_subtile = [&](int st, int stage, int blocks) {
    T* k_dst = warp_s + stage * 2 * Layout::kTileElems;
    T* v_dst = k_dst + Layout::kTileElems;
#pragma unroll
    for (int i = 0; i < kChunksPerLane; ++i) {
      const int chunk = lane + i * kWarpSize;
      const int t = chunk / kChunksPerRow, c = chunk % kChunksPerRow;
      const int64_t block = __shfl_sync(0xffffffffu, blocks, t);
      if (st >= num_subtiles) continue;
      const int position = range_start + st * kTileTokens + t;
      const bool inside = position < range_end;
      const T* src = layer_base;   // any valid address when zero-filling
      if (inside) {
        src = layer_base + block * block_stride + static_cast<int64_t>(position % block_size) * HEAD_SIZE + c * 8;
      }
      cp_async_16(k_dst + t * kRowElems + c * 8, src, inside ? 16 : 0);
      cp_async_16(v_dst + t * kRowElems + c * 8, inside ? src + kv_stride : src, inside ? 16 : 0);
    }
  };

  // Prologue: the first kStages - 1 sub-tiles in flight (one commit group each, empty past the end).
#pragma unroll
  for (int ahead = 0; ahead < kStages - 1; ++ahead) {
    load_subtile(warp + ahead * kNumWarps, ahead, fetch_blocks(warp + ahead * kNumWarps));
    cp_async_commit();
  }
  int next_blocks = fetch_blocks(warp + (kStages - 1) * kNumWarps);
  for (int step = 0, st = warp; st < num_subtiles; ++step, st += kNumWarps) {
    const int stage = step % kStages;
    // Refill the stage computed on last step with the sub-tile kStages - 1 ahead of this one.
    load_subtile(st + (kStages - 1) * kNumWarps, (step + kStages - 1) % kStages, next_blocks);
    cp_async_commit();
    next_blocks = fetch_blocks(st + kStages * kNumWarps);
    cp_async_wait<kStages - 1>();   // this step's group is complete; the later ones may be in flight
    __syncwarp();
    const T* k_s = warp_s + stage * 2 * Layout::kTileElems;
    const T* v_s = k_s + Layout::kTileElems;

    // S[16 rows x 16 tokens] = Q K^T: s[0] = tokens 0-7 (n-tile 0), s[1] = tokens 8-15 (n-tile 1).
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a[4], b[4];
      const int m = lane / 8;
      ldmatrix_x4(a, q_s + ((m % 2) * 8 + lane % 8) * kRowElems + kk * 16 + (m / 2) * 8);
      ldmatrix_x4(b, k_s + ((m / 2) * 8 + lane % 8) * kRowElems + kk * 16 + (m % 2) * 8);
      mma_16816<T>(s[0], a, b[0], b[1]);
      mma_16816<T>(s[1], a, b[2], b[3]);
    }

    // Mask and online softmax (log2 domain). In the mma C layout this lane holds row0 at s[n][0..1] and
    // row1 at s[n][2..3]; the token of s[n][c] is tile start + n * 8 + (lane % 4) * 2 + c % 2.
    const int tile_start = range_start + st * kTileTokens;
    float tile_max0 = -INFINITY, tile_max1 = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int position = tile_start + n * 8 + (lane % 4) * 2 + c % 2;
        const bool visible = position < (c < 2 ? limit0 : limit1);
        s[n][c] = visible ? s[n][c] * scale_log2 : -INFINITY;
        if (c < 2) tile_max0 = fmaxf(tile_max0, s[n][c]);
        else tile_max1 = fmaxf(tile_max1, s[n][c]);
      }
    }
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {   // the 4 lanes of a quad share rows
      tile_max0 = fmaxf(tile_max0, __shfl_xor_sync(0xffffffffu, tile_max0, offset));
      tile_max1 = fmaxf(tile_max1, __shfl_xor_sync(0xffffffffu, tile_max1, offset));
    }
    const float new0 = fmaxf(m0, tile_max0), new1 = fmaxf(m1, tile_max1);
    // A row with nothing visible yet keeps max -inf; subtracting 0 instead keeps exp2 away from NaN.
    const float ref0 = new0 == -INFINITY ? 0.f : new0, ref1 = new1 == -INFINITY ? 0.f : new1;
    const float alpha0 = exp2f(m0 - ref0), alpha1 = exp2f(m1 - ref1);
    m0 = new0;
    m1 = new1;
    float p[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) p[n][c] = exp2f(s[n][c] - (c < 2 ? ref0 : ref1));
    }
    l0 = l0 * alpha0 + p[0][0] + p[0][1] + p[1][0] + p[1][1];
    l1 = l1 * alpha1 + p[0][2] + p[0][3] + p[1][2] + p[1][3];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
      o[n][0] *= alpha0;
      o[n][1] *= alpha0;
      o[n][2] *= alpha1;
      o[n][3] *= alpha1;
    }

    // O += P V: P's A fragment is the S accumulators re-packed (the C layout of two n8 tiles is the A
    // layout of one k16 step); V's B fragments come transposed from its [token, dim] rows.
    const uint32_t pa[4] = {pack2<T>(p[0][0], p[0][1]), pack2<T>(p[0][2], p[0][3]), pack2<T>(p[1][0], p[1][1]),
                            pack2<T>(p[1][2], p[1][3])};
#pragma unroll
    for (int n = 0; n < kNTiles; n += 2) {
      uint32_t b[4];
      const int m = lane / 8;
      ldmatrix_x4_trans(b, v_s + ((m % 2) * 8 + lane % 8) * kRowElems + n * 8 + (m / 2) * 8);
      mma_16816<T>(o[n], pa, b[0], b[1]);
      mma_16816<T>(o[n + 1], pa, b[2], b[3]);
    }
    __syncwarp();   // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();
  __syncwarp();

  // This warp's partial result -> its (now free) staging area: O [kRows, HEAD_SIZE] fp32, max, sum.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float* o_s = reinterpret_cast<float*>(warp_s);
#pragma unroll
  for (int n = 0; n < kNTiles; ++n) {
    const int col = n * 8 + (lane % 4) * 2;
    o_s[row0 * HEAD_SIZE + col] = o[n][0];
    o_s[row0 * HEAD_SIZE + col + 1] = o[n][1];
    o_s[row1 * HEAD_SIZE + col] = o[n][2];
    o_s[row1 * HEAD_SIZE + col + 1] = o[n][3];
  }
  if (lane % 4 == 0) {
    max_s[warp * kRows + row0] = m0;
    max_s[warp * kRows + row1] = m1;
    sum_s[warp * kRows + row0] = l0;
    sum_s[warp * kRows + row1] = l1;
  }
  __syncthreads();

  // Merge the warps: O = sum_w 2^(m_w - M) O_w, L = sum_w 2^(m_w - M) l_w; one thread per (row, dim).
  for (int i = tid; i < kRows * HEAD_SIZE; i += kNumThreads) {
    const int r = i / HEAD_SIZE, d = i % HEAD_SIZE;
    if (!row_valid(r)) continue;
    float row_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) row_max = fmaxf(row_max, max_s[w * kRows + r]);
    float acc = 0.f, total = 0.f;
    if (row_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kNumWarps; ++w) {
        const float weight = exp2f(max_s[w * kRows + r] - row_max);   // 0 for a warp that saw nothing
        acc += weight * reinterpret_cast<const float*>(smem + Layout::kQBytes + w * Layout::kWarpBytes)[i];
        total += weight * sum_s[w * kRows + r];
      }
    }
    const int64_t token = token_base + first_token + r / tiling.heads;
    const int64_t head_row = token * num_heads + first_head + r % tiling.heads;   // (token, head)
    if constexpr (PARTITIONED) {
      const int64_t slot = head_row * partitions + partition;
      tmp_out[slot * HEAD_SIZE + d] = acc;
      if (d == 0) {
        max_logits[slot] = row_max;
        exp_sums[slot] = total;
      }
    } else {
      out[head_row * HEAD_SIZE + d] = from_float<T>(total > 0.f ? acc / total : 0.f);   // empty context -> 0
    }
  }
}

// Merges the partitions of one (token, head): out = sum_p 2^(m_p - M) O_p / sum_p 2^(m_p - M) l_p.
// Partitions a row could not see hold max -inf (and unwritten O), and are skipped.
// Grid: (num_tokens, num_heads); block: kNumThreads.
template <typename T, int HEAD_SIZE>
__global__ void __launch_bounds__(kNumThreads) paged_attention_reduce_kernel(
    T* __restrict__ out,                     // [num_tokens, num_heads, HEAD_SIZE]
    const float* __restrict__ exp_sums,      // [num_tokens, num_heads, partitions]
    const float* __restrict__ max_logits,    // [num_tokens, num_heads, partitions]
    const float* __restrict__ tmp_out,       // [num_tokens, num_heads, partitions, HEAD_SIZE]
    int num_heads, int partitions) {
  const int64_t head_row = static_cast<int64_t>(blockIdx.x) * num_heads + blockIdx.y;
  const float* maxes = max_logits + head_row * partitions;
  const float* sums = exp_sums + head_row * partitions;
  float global_max = -INFINITY;
  for (int p = 0; p < partitions; ++p) global_max = fmaxf(global_max, maxes[p]);
  float denom = 0.f;
  if (global_max != -INFINITY) {
    for (int p = 0; p < partitions; ++p) {
      if (maxes[p] != -INFINITY) denom += exp2f(maxes[p] - global_max) * sums[p];
    }
  }
  const float inv_denom = denom > 0.f ? 1.f / denom : 0.f;
  for (int d = threadIdx.x; d < HEAD_SIZE; d += kNumThreads) {
    float acc = 0.f;
    for (int p = 0; p < partitions; ++p) {
      if (maxes[p] != -INFINITY) acc += exp2f(maxes[p] - global_max) * tmp_out[(head_row * partitions + p) * HEAD_SIZE + d];
    }
    out[head_row * HEAD_SIZE + d] = from_float<T>(acc * inv_denom);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Split-K heuristic, from the H200 measurements of benchmarks/paged_attention_bench.py. A thread block
// costs a fixed ~4 us (launch, Q tile, pipeline fill, merge) plus one latency-bound step per sub-tile
// per warp; blocks of one wave run side by side. So when the unsplit grid (one block per row tile and
// kv head) fills less than a wave, partitions (split-K) add parallelism at no cost in waves: the count
// is the number of partitions that fills one wave, floor(slots / unsplit blocks), but no partition is
// shorter than kMinPartitionTokens (shorter ones are all fixed cost). A grid of a wave or more is not
// split: an extra wave of fixed costs and the reduce kernel cost more than its tail wastes.
// partition_mode: -1 this heuristic, 0 never, 1 always (the heuristic's count, at least 2), >= 2 that
// many partitions (sweeps).
constexpr int kMinPartitionTokens = 512;
constexpr int kMaxPartitions = 64;

struct Partitioning {
  int count;   // 0: not partitioned
  int size;    // tokens per partition, a multiple of kTileTokens
};

Partitioning partitions_of(int64_t max_seq_len, int64_t count) {
  if (count < 2 || max_seq_len <= kTileTokens) return Partitioning{0, 0};
  const int64_t per = (max_seq_len + count - 1) / count;
  const int size = static_cast<int>((per + kTileTokens - 1) / kTileTokens * kTileTokens);
  return Partitioning{static_cast<int>((max_seq_len + size - 1) / size), size};
}

Partitioning choose_partitions(int64_t unsplit_blocks, int64_t max_seq_len, int64_t partition_mode, int slots) {
  if (partition_mode == 0) return Partitioning{0, 0};
  if (partition_mode >= 2) return partitions_of(max_seq_len, std::min<int64_t>(partition_mode, kMaxPartitions));
  const int64_t longest = std::max<int64_t>(max_seq_len / kMinPartitionTokens, 1);
  const int64_t fill = std::max<int64_t>(slots / std::max<int64_t>(unsplit_blocks, 1), 1);
  const int64_t count = std::min({fill, longest, static_cast<int64_t>(kMaxPartitions)});
  return partitions_of(max_seq_len, partition_mode == 1 ? std::max<int64_t>(count, 2) : count);
}

// Resident thread blocks per SM times SMs: one wave of the grid.
template <typename Kernel>
int grid_slots(Kernel kernel, int shared_bytes, int device) {
  int num_sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kNumThreads, shared_bytes));
  return std::max(per_sm, 1) * num_sms;
}

constexpr int kMaxDevices = 64;

// Once per kernel instantiation and device (not per layer per step): raise both variants' dynamic
// shared-memory limit, and return the grid slots of a wave. Concurrent first calls compute the same
// value, so the unsynchronised cache is benign.
template <typename Kernel>
int prepare_kernels(Kernel single, Kernel split, int shared_bytes, int device, std::atomic<int>* slots_cache) {
  if (device >= 0 && device < kMaxDevices) {
    if (const int cached = slots_cache[device].load(std::memory_order_relaxed); cached > 0) return cached;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(single, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
  C10_CUDA_CHECK(cudaFuncSetAttribute(split, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
  const int slots = grid_slots(single, shared_bytes, device);
  if (device >= 0 && device < kMaxDevices) slots_cache[device].store(slots, std::memory_order_relaxed);
  return slots;
}

template <typename scalar_t, int HEAD_SIZE>
void launch_paged_attention(at::Tensor& out,               // [T, num_heads, HEAD_SIZE]
                            const at::Tensor& query,       // [T, num_heads, HEAD_SIZE]
                            const at::Tensor& kv_cache,    // [num_blocks, num_layers, 2, num_kv_heads, block_size, HEAD_SIZE]
                            int64_t layer,
                            const at::Tensor& block_tables,                    // [S, max_blocks] int32
                            const at::Tensor& seq_lens,                        // [S] int32
                            const std::optional<at::Tensor>& query_start_loc,  // [S + 1] int32, or none (decode)
                            double scale, int64_t max_seq_len, int64_t max_query_len, int64_t partition_mode) {
  using T = typename CudaType<scalar_t>::type;
  using Layout = SharedLayout<T, HEAD_SIZE>;
  const int num_tokens = static_cast<int>(query.size(0));
  const int num_seqs = static_cast<int>(seq_lens.size(0));
  const int num_heads = static_cast<int>(query.size(1));
  const int num_kv_heads = static_cast<int>(kv_cache.size(3));
  const RowTiling tiling = row_tiling(num_heads / num_kv_heads);
  // Decode: one tile per sequence. Prefill: ceil(q_len / tokens) per sequence, at most this many.
  const bool decode = !query_start_loc.has_value();
  const int64_t row_tiles = decode ? num_seqs : (num_tokens + tiling.tokens - 1) / tiling.tokens + num_seqs;
  const int device = query.get_device();
  auto single_kernel = paged_attention_kernel<T, HEAD_SIZE, false>;
  auto split_kernel = paged_attention_kernel<T, HEAD_SIZE, true>;
  static std::atomic<int> slots_per_device[kMaxDevices] = {};   // this instantiation's, per device
  const int slots = prepare_kernels(single_kernel, split_kernel, Layout::kTotal, device, slots_per_device);
  const Partitioning split = choose_partitions(row_tiles * num_kv_heads * tiling.head_tiles, max_seq_len,
                                               partition_mode, slots);
  const int partitions = split.count;
  const dim3 grid(static_cast<unsigned>(row_tiles), num_kv_heads * tiling.head_tiles, std::max(partitions, 1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  auto* out_ptr = reinterpret_cast<T*>(out.data_ptr());
  const auto* q_ptr = reinterpret_cast<const T*>(query.data_ptr());
  const auto* kv_ptr = reinterpret_cast<const T*>(kv_cache.data_ptr());
  const int* starts = decode ? nullptr : query_start_loc->data_ptr<int>();
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  const int block_size = static_cast<int>(kv_cache.size(4));
  const int max_blocks = static_cast<int>(block_tables.size(1));
  (void)max_query_len;   // bounded by num_tokens; kept in the signature for future tilings

  auto run = [&](auto kernel, float* sums, float* maxes, float* partial, int parts) {
    kernel<<<grid, kNumThreads, Layout::kTotal, stream>>>(
        out_ptr, sums, maxes, partial, q_ptr, kv_ptr, block_tables.data_ptr<int>(), seq_lens.data_ptr<int>(),
        starts, num_seqs, static_cast<int>(layer), num_heads, num_kv_heads, block_size, max_blocks, parts,
        split.size, scale_log2, query.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (partitions == 0) {
    run(single_kernel, nullptr, nullptr, nullptr, 1);
    return;
  }
  auto float_opts = query.options().dtype(at::kFloat);
  at::Tensor exp_sums = at::empty({num_tokens, num_heads, partitions}, float_opts);                // [T, H, P]
  at::Tensor max_logits = at::empty({num_tokens, num_heads, partitions}, float_opts);              // [T, H, P]
  at::Tensor tmp_out = at::empty({num_tokens, num_heads, partitions, HEAD_SIZE}, float_opts);      // [T, H, P, D]
  run(split_kernel, exp_sums.data_ptr<float>(), max_logits.data_ptr<float>(),
      tmp_out.data_ptr<float>(), partitions);
  paged_attention_reduce_kernel<T, HEAD_SIZE><<<dim3(num_tokens, num_heads), kNumThreads, 0, stream>>>(
      out_ptr, exp_sums.data_ptr<float>(), max_logits.data_ptr<float>(), tmp_out.data_ptr<float>(), num_heads,
      partitions);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_head_size(at::Tensor& out,              // [T, num_heads, head_size]
                        const at::Tensor& query,      // [T, num_heads, head_size]
                        const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                        int64_t layer,
                        const at::Tensor& block_tables,                    // [S, max_blocks] int32
                        const at::Tensor& seq_lens,                        // [S] int32
                        const std::optional<at::Tensor>& query_start_loc,  // [S + 1] int32, or none
                        double scale, int64_t max_seq_len, int64_t max_query_len, int64_t partition_mode) {
  switch (query.size(2)) {
#define PAGEDSERVE_HEAD_CASE(D)                                                                                   \
  case D:                                                                                                        \
    launch_paged_attention<scalar_t, D>(out, query, kv_cache, layer, block_tables, seq_lens, query_start_loc,     \
                                        scale, max_seq_len, max_query_len, partition_mode);                      \
    break;
    PAGEDSERVE_HEAD_CASE(64)
    PAGEDSERVE_HEAD_CASE(80)
    PAGEDSERVE_HEAD_CASE(96)
    PAGEDSERVE_HEAD_CASE(128)
    PAGEDSERVE_HEAD_CASE(256)
#undef PAGEDSERVE_HEAD_CASE
    default:
      TORCH_CHECK(false, "paged_attention: unsupported head size ", query.size(2),
                  " (supported: 64, 80, 96, 128, 256)");
  }
}

// Inputs are checked by the binding (bindings.cpp). Every seq_lens entry must be <= max_seq_len, and
// each sequence's query length <= its seq_len.
void paged_attention(at::Tensor& out,              // [T, num_heads, head_size]
                     const at::Tensor& query,      // [T, num_heads, head_size]
                     const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                     int64_t layer,
                     const at::Tensor& block_tables,                    // [S, max_blocks] int32
                     const at::Tensor& seq_lens,                        // [S] int32
                     const std::optional<at::Tensor>& query_start_loc,  // [S + 1] int32, or none (decode)
                     double scale, int64_t max_seq_len, int64_t max_query_len, int64_t partition_mode) {
  if (query.size(0) == 0 || seq_lens.size(0) == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  switch (query.scalar_type()) {
    case at::kHalf:
      dispatch_head_size<at::Half>(out, query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                                   max_seq_len, max_query_len, partition_mode);
      break;
    case at::kBFloat16:
      dispatch_head_size<at::BFloat16>(out, query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale,
                                       max_seq_len, max_query_len, partition_mode);
      break;
    default:
      TORCH_CHECK(false, "paged_attention: unsupported dtype ", query.scalar_type(),
                  " (supported: float16, bfloat16)");
  }
}

}  // namespace pagedserve
