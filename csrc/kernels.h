// The launchers of the PagedServe kernels (defined in paged_attention.cu, cache_kernels.cu,
// layer_kernels.cu and sampling_kernels.cu; the argument checks are in bindings.cpp). Shapes: T tokens,
// S sequences, P block pairs (copy_blocks) or rotary positions (rotary_embedding), N rows, H hidden size,
// I intermediate size, R rotary dim (rotary_embedding) or sampling rows (race_uniform_noise), K token ids.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace pagedserve {

void paged_attention(at::Tensor& out,              // [T, num_heads, head_size]
                     const at::Tensor& query,      // [T, num_heads, head_size]
                     const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                     int64_t layer,
                     const at::Tensor& block_tables,                    // [S, max_blocks] int32
                     const at::Tensor& seq_lens,                        // [S] int32
                     const std::optional<at::Tensor>& query_start_loc,  // [S + 1] int32, or none (decode)
                     double scale, int64_t max_seq_len, int64_t max_query_len, int64_t partition_mode);
void reshape_and_cache(const at::Tensor& key,            // [T, num_kv_heads, head_size]
                       const at::Tensor& value,          // [T, num_kv_heads, head_size]
                       at::Tensor& kv_cache,             // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                       int64_t layer,
                       const at::Tensor& slot_mapping);  // [T] int64
void copy_blocks(at::Tensor& kv_cache,        // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                 const at::Tensor& pairs);    // [P, 2] int64
void rms_norm(at::Tensor& out,              // [N, H] contiguous
              const at::Tensor& input,      // [N, H], last dim contiguous
              const at::Tensor& weight,     // [H]
              double eps);
void fused_add_rms_norm(at::Tensor& out,             // [N, H] contiguous
                        const at::Tensor& input,     // [N, H], last dim contiguous
                        at::Tensor& residual,        // [N, H] contiguous, becomes input + residual
                        const at::Tensor& weight,    // [H]
                        double eps);
void silu_and_mul(at::Tensor& out,              // [N, I] contiguous
                  const at::Tensor& input);     // [N, 2 * I], last dim contiguous
void rotary_embedding(const at::Tensor& positions,   // [N] int64
                      at::Tensor& query,             // [N, num_heads, head_size], rotated in place
                      at::Tensor& key,               // [N, num_kv_heads, head_size], rotated in place
                      const at::Tensor& cos_sin,     // [P, R] float32
                      int64_t rotary_dim);

void race_uniform_noise(at::Tensor& out,              // [R, K] float32
                        const at::Tensor& ids,        // [R, K] or [1, K] int64
                        const at::Tensor& key_lo,     // [R] int64
                        const at::Tensor& key_hi);    // [R] int64

}  // namespace pagedserve
