// The launchers of the PagedServe kernels (defined in paged_attention.cu and cache_kernels.cu; the
// argument checks are in bindings.cpp). Shapes: T tokens, S sequences, P block pairs.
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

}  // namespace pagedserve
