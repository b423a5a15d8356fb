// Python bindings of the PagedServe CUDA kernels, with the input checks that turn a wrong call into a
// clear error instead of a wrong result or an illegal memory access.

#include <torch/extension.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <string>

namespace pagedserve {

namespace {

// Argument checks never throw: each returns the first problem as a message (empty when the call is
// fine), and the Python wrappers in executor_svc/ops.py raise ValueError with it. On the torch 2.11 /
// CUDA 13.0 device image an exception leaving this extension's calls crashed the interpreter
// (SIGSEGV) -- although small test extensions built with the same toolchain raise cleanly
// (benchmarks/device/extension_exception_probe.py) -- so a bad argument must not reach a throw. Errors
// the CUDA runtime reports at launch still raise through torch's handlers (torch::wrap_pybind_function).
// The probe's cases that raise cleanly never build a std::ostringstream in the extension; ours did.
// Messages are assembled with std::string alone: a std::ostringstream instantiated in this extension
// crashed the interpreter on the device image (see above), and none of our arguments needs one.
inline void append(std::string& text, const char* part) { text += part; }
inline void append(std::string& text, const std::string& part) { text += part; }
inline void append(std::string& text, const c10::Device& part) { text += part.str(); }
inline void append(std::string& text, c10::ScalarType part) { text += c10::toString(part); }
inline void append(std::string& text, at::IntArrayRef part) {
  text += "[";
  for (size_t i = 0; i < part.size(); ++i) text += (i ? ", " : "") + std::to_string(part[i]);
  text += "]";
}
template <typename Int, std::enable_if_t<std::is_integral_v<Int>, int> = 0>
void append(std::string& text, Int part) {
  text += std::to_string(part);
}

template <typename... Parts>
std::string message_of(const Parts&... parts) {
  std::string text;
  (append(text, parts), ...);
  return text;
}

#define PAGEDSERVE_REQUIRE(ok, ...) \
  do {                              \
    if (!(ok)) return message_of(__VA_ARGS__); \
  } while (0)
#define PAGEDSERVE_TRY(check)                       \
  do {                                              \
    if (std::string problem = (check); !problem.empty()) return problem; \
  } while (0)

std::string check_cuda(const at::Tensor& t,          // [any]
                const char* op, const char* name, const at::Device& device, const char* reference = "kv_cache") {
  PAGEDSERVE_REQUIRE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  PAGEDSERVE_REQUIRE(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", reference, " is on ", device);
  return {};
}

std::string check_cache(const at::Tensor& kv_cache,   // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                 const char* op, int64_t layer) {
  PAGEDSERVE_REQUIRE(kv_cache.is_cuda(), op, ": kv_cache must be a CUDA tensor, got one on ", kv_cache.device());
  PAGEDSERVE_REQUIRE(kv_cache.dim() == 6 && kv_cache.size(2) == 2, op,
              ": kv_cache must be [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size], got ",
              kv_cache.sizes());
  PAGEDSERVE_REQUIRE(kv_cache.is_contiguous(), op, ": kv_cache must be contiguous");
  PAGEDSERVE_REQUIRE(reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % 16 == 0, op,
              ": kv_cache must be 16-byte aligned");
  PAGEDSERVE_REQUIRE(layer >= 0 && layer < kv_cache.size(1), op, ": layer ", layer, " out of range [0, ",
              kv_cache.size(1), ")");
  return {};
}

std::string check_rows(const at::Tensor& t,   // [N, num_heads, head_size]
                const char* op, const char* name, int64_t heads, int64_t head_size) {
  PAGEDSERVE_REQUIRE(t.dim() == 3 && t.size(1) == heads && t.size(2) == head_size, op, ": ", name, " must be [N, ", heads,
              ", ", head_size, "], got ", t.sizes());
  PAGEDSERVE_REQUIRE(t.stride(2) == 1 && t.stride(1) == head_size, op, ": ", name,
              " must have contiguous heads (strides [*, head_size, 1]), got strides ", t.strides());
  return {};
}

// A 2-D fp16/bf16 CUDA activation on `device` with a contiguous last dim (rows may be strided).
std::string check_rows_2d(const at::Tensor& t,   // [N, features]
                          const char* op, const char* name, const at::Device& device) {
  PAGEDSERVE_REQUIRE(t.is_cuda() && t.device() == device, op, ": ", name, " must be on ", device, ", got ",
              t.device());
  PAGEDSERVE_REQUIRE(t.dim() == 2, op, ": ", name, " must be 2-D [N, features], got ", t.sizes());
  PAGEDSERVE_REQUIRE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " has unsupported dtype ", t.scalar_type(), " (supported: float16, bfloat16)");
  PAGEDSERVE_REQUIRE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " needs a contiguous last dim, got strides ",
              t.strides());
  PAGEDSERVE_REQUIRE(t.size(0) <= INT32_MAX && t.size(1) <= INT32_MAX, op, ": ", name, " is too large: ", t.sizes());
  return {};
}

// `out`, contiguous, shaped [input rows, features] and typed like `input`.
std::string check_output(const at::Tensor& out,     // [N, features]
                         const at::Tensor& input,   // [N, *]
                         int64_t features, const char* op) {
  PAGEDSERVE_TRY(check_rows_2d(out, op, "out", input.device()));
  PAGEDSERVE_REQUIRE(out.is_contiguous() && out.size(0) == input.size(0) && out.size(1) == features, op,
              ": out must be a contiguous [", input.size(0), ", ", features, "] tensor, got ", out.sizes());
  PAGEDSERVE_REQUIRE(out.scalar_type() == input.scalar_type(), op, ": out and input must share a dtype, got ",
              out.scalar_type(), " and ", input.scalar_type());
  return {};
}

std::string check_norm(const at::Tensor& out,      // [N, H]
                       const at::Tensor& input,    // [N, H]
                       const at::Tensor& weight,   // [H]
                       double eps, const char* op) {
  PAGEDSERVE_TRY(check_rows_2d(input, op, "input", input.device()));
  PAGEDSERVE_TRY(check_output(out, input, input.size(1), op));
  PAGEDSERVE_REQUIRE(weight.device() == input.device() && weight.dim() == 1 && weight.size(0) == input.size(1) &&
                  weight.is_contiguous() && weight.scalar_type() == input.scalar_type(),
              op, ": weight must be a contiguous [", input.size(1), "] tensor of ", input.scalar_type(), " on ",
              input.device(), ", got ", weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  PAGEDSERVE_REQUIRE(eps >= 0.0, op, ": eps must be >= 0");
  PAGEDSERVE_REQUIRE(input.numel() == 0 || out.data_ptr() != input.data_ptr(), op,
              ": out and input must not share memory");
  return {};
}

}  // namespace

std::string paged_attention_checked(
    at::Tensor& out,                                   // [T, num_heads, head_size]
    const at::Tensor& query,                           // [T, num_heads, head_size]
    const at::Tensor& kv_cache,                        // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
    int64_t layer,
    const at::Tensor& block_tables,                    // [S, max_blocks] int32
    const at::Tensor& seq_lens,                        // [S] int32
    const std::optional<at::Tensor>& query_start_loc,  // [S + 1] int32; none: decode, one token per sequence
    double scale, int64_t max_seq_len, int64_t max_query_len, int64_t partition_mode) {
  constexpr const char* op = "paged_attention";
  PAGEDSERVE_TRY(check_cache(kv_cache, op, layer));
  const at::Device device = kv_cache.device();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{out, "out"}, {query, "query"},
                                {block_tables, "block_tables"}, {seq_lens, "seq_lens"}}) {
    PAGEDSERVE_TRY(check_cuda(t, op, name, device));
  }
  const int64_t num_kv_heads = kv_cache.size(3), head_size = kv_cache.size(5);
  PAGEDSERVE_REQUIRE(query.dim() == 3, op, ": query must be [T, num_heads, head_size], got ", query.sizes());
  const int64_t num_tokens = query.size(0), num_heads = query.size(1);
  PAGEDSERVE_REQUIRE(num_heads % num_kv_heads == 0, op, ": num_heads ", num_heads, " must be a multiple of num_kv_heads ",
          num_kv_heads);
  PAGEDSERVE_REQUIRE(head_size == 64 || head_size == 80 || head_size == 96 || head_size == 128 || head_size == 256, op,
          ": unsupported head size ", head_size, " (supported: 64, 80, 96, 128, 256)");
  PAGEDSERVE_TRY(check_rows(query, op, "query", num_heads, head_size));
  // The kernel loads query rows as 16-byte vectors.
  PAGEDSERVE_REQUIRE(reinterpret_cast<uintptr_t>(query.data_ptr()) % 16 == 0 && query.stride(0) % 8 == 0, op,
          ": query rows must be 16-byte aligned (row stride a multiple of 8 elements), got stride ", query.stride(0));
  PAGEDSERVE_REQUIRE(out.sizes() == query.sizes() && out.is_contiguous(), op,
          ": out must be a contiguous tensor shaped like query ", query.sizes(), ", got ", out.sizes());
  const auto dtype = kv_cache.scalar_type();
  PAGEDSERVE_REQUIRE(dtype == at::kHalf || dtype == at::kBFloat16, op, ": unsupported dtype ", dtype,
          " (supported: float16, bfloat16)");
  PAGEDSERVE_REQUIRE(query.scalar_type() == dtype && out.scalar_type() == dtype, op,
          ": query, out and kv_cache must share a dtype, got ", query.scalar_type(), ", ", out.scalar_type(), ", ",
          dtype);
  PAGEDSERVE_REQUIRE(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.is_contiguous(), op,
          ": seq_lens must be a contiguous int32 [S] tensor, got ", seq_lens.scalar_type(), " ", seq_lens.sizes());
  const int64_t num_seqs = seq_lens.size(0);
  PAGEDSERVE_REQUIRE(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
              block_tables.is_contiguous(),
          op, ": block_tables must be a contiguous int32 [S=", num_seqs, ", max_blocks] tensor, got ",
          block_tables.scalar_type(), " ", block_tables.sizes());
  if (query_start_loc.has_value()) {
    const at::Tensor& starts = *query_start_loc;
    PAGEDSERVE_TRY(check_cuda(starts, op, "query_start_loc", device));
    PAGEDSERVE_REQUIRE(starts.scalar_type() == at::kInt && starts.dim() == 1 && starts.size(0) == num_seqs + 1 &&
                starts.is_contiguous(),
            op, ": query_start_loc must be a contiguous int32 [S + 1 = ", num_seqs + 1, "] tensor, got ",
            starts.scalar_type(), " ", starts.sizes());
  } else {
    PAGEDSERVE_REQUIRE(num_tokens == num_seqs, op, ": without query_start_loc (decode) query needs one row per sequence: ",
            num_tokens, " rows for ", num_seqs, " sequences");
  }
  PAGEDSERVE_REQUIRE(max_seq_len >= 0 && block_tables.size(1) * kv_cache.size(4) >= max_seq_len, op, ": max_seq_len ",
          max_seq_len, " does not fit block_tables of ", block_tables.size(1), " blocks");
  PAGEDSERVE_REQUIRE(max_query_len >= 0 && max_query_len <= std::max<int64_t>(max_seq_len, 0), op, ": max_query_len ",
          max_query_len, " exceeds max_seq_len ", max_seq_len);
  PAGEDSERVE_REQUIRE(partition_mode >= -1, op,
          ": partition_mode must be -1 (auto), 0 (never split), 1 (always) or a partition count >= 2");
  paged_attention(out, query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, max_seq_len,
                  max_query_len, partition_mode);
  return {};
}

std::string reshape_and_cache_checked(const at::Tensor& key,            // [T, num_kv_heads, head_size]
                               const at::Tensor& value,          // [T, num_kv_heads, head_size]
                               at::Tensor& kv_cache,             // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                               int64_t layer,
                               const at::Tensor& slot_mapping) { // [T] int64
  constexpr const char* op = "reshape_and_cache";
  PAGEDSERVE_TRY(check_cache(kv_cache, op, layer));
  const at::Device device = kv_cache.device();
  PAGEDSERVE_TRY(check_cuda(key, op, "key", device));
  PAGEDSERVE_TRY(check_cuda(value, op, "value", device));
  PAGEDSERVE_TRY(check_cuda(slot_mapping, op, "slot_mapping", device));
  const int64_t num_kv_heads = kv_cache.size(3), head_size = kv_cache.size(5);
  PAGEDSERVE_REQUIRE(key.dim() == 3 && value.dim() == 3 && key.sizes() == value.sizes(), op,
              ": key and value must both be [T, num_kv_heads, head_size], got ", key.sizes(), " and ", value.sizes());
  PAGEDSERVE_REQUIRE(key.size(1) == num_kv_heads && key.size(2) == head_size, op, ": key must be [T, ", num_kv_heads,
              ", ", head_size, "] to match kv_cache, got ", key.sizes());
  PAGEDSERVE_REQUIRE(key.stride(2) == 1 && value.stride(2) == 1, op, ": key and value need a contiguous last dim");
  PAGEDSERVE_REQUIRE(key.scalar_type() == kv_cache.scalar_type() && value.scalar_type() == kv_cache.scalar_type(), op,
              ": key, value and kv_cache must share a dtype, got ", key.scalar_type(), ", ", value.scalar_type(),
              ", ", kv_cache.scalar_type());
  PAGEDSERVE_REQUIRE(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
              op, ": slot_mapping must be a contiguous int64 [T=", key.size(0), "] tensor, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  reshape_and_cache(key, value, kv_cache, layer, slot_mapping);
  return {};
}

std::string copy_blocks_checked(at::Tensor& kv_cache,        // [num_blocks, num_layers, 2, num_kv_heads, block_size, head_size]
                         const at::Tensor& pairs) {   // [P, 2] int64
  constexpr const char* op = "copy_blocks";
  PAGEDSERVE_TRY(check_cache(kv_cache, op, 0));
  PAGEDSERVE_TRY(check_cuda(pairs, op, "pairs", kv_cache.device()));
  PAGEDSERVE_REQUIRE(pairs.scalar_type() == at::kLong && pairs.dim() == 2 && pairs.size(1) == 2 && pairs.is_contiguous(),
              op, ": pairs must be a contiguous int64 [P, 2] tensor of (src, dst), got ", pairs.scalar_type(), " ",
              pairs.sizes());
  copy_blocks(kv_cache, pairs);
  return {};
}

std::string rms_norm_checked(at::Tensor& out,            // [N, H] contiguous
                             const at::Tensor& input,    // [N, H], last dim contiguous
                             const at::Tensor& weight,   // [H]
                             double eps) {
  PAGEDSERVE_TRY(check_norm(out, input, weight, eps, "rms_norm"));
  rms_norm(out, input, weight, eps);
  return {};
}

std::string fused_add_rms_norm_checked(at::Tensor& out,            // [N, H] contiguous
                                       const at::Tensor& input,    // [N, H], last dim contiguous
                                       at::Tensor& residual,       // [N, H] contiguous, becomes input + residual
                                       const at::Tensor& weight,   // [H]
                                       double eps) {
  constexpr const char* op = "fused_add_rms_norm";
  PAGEDSERVE_TRY(check_norm(out, input, weight, eps, op));
  PAGEDSERVE_TRY(check_rows_2d(residual, op, "residual", input.device()));
  PAGEDSERVE_REQUIRE(residual.is_contiguous() && residual.sizes() == input.sizes() &&
                  residual.scalar_type() == input.scalar_type(),
              op, ": residual must be a contiguous ", input.sizes(), " tensor of ", input.scalar_type(), ", got ",
              residual.scalar_type(), " ", residual.sizes());
  PAGEDSERVE_REQUIRE(input.numel() == 0 || residual.data_ptr() != out.data_ptr(), op,
              ": out and residual must not share memory");
  fused_add_rms_norm(out, input, residual, weight, eps);
  return {};
}

std::string silu_and_mul_checked(at::Tensor& out,             // [N, I] contiguous
                                 const at::Tensor& input) {   // [N, 2 * I], last dim contiguous
  constexpr const char* op = "silu_and_mul";
  PAGEDSERVE_TRY(check_rows_2d(input, op, "input", input.device()));
  PAGEDSERVE_REQUIRE(input.size(1) % 2 == 0, op, ": input must be [N, 2 * I] (gate, then up), got ", input.sizes());
  PAGEDSERVE_TRY(check_output(out, input, input.size(1) / 2, op));
  silu_and_mul(out, input);
  return {};
}

std::string rotary_embedding_checked(const at::Tensor& positions,   // [N] int64
                                     at::Tensor& query,             // [N, num_heads, head_size]
                                     at::Tensor& key,               // [N, num_kv_heads, head_size]
                                     const at::Tensor& cos_sin,     // [P, R] float32
                                     int64_t rotary_dim) {
  constexpr const char* op = "rotary_embedding";
  const at::Device device = query.device();
  PAGEDSERVE_REQUIRE(query.is_cuda(), op, ": query must be a CUDA tensor, got one on ", device);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{key, "key"}, {positions, "positions"},
                                {cos_sin, "cos_sin"}}) {
    PAGEDSERVE_TRY(check_cuda(t, op, name, device, "query"));
  }
  PAGEDSERVE_REQUIRE(query.dim() == 3 && key.dim() == 3 && key.size(0) == query.size(0) &&
                  key.size(2) == query.size(2),
              op, ": query must be [N, num_heads, head_size] and key [N, num_kv_heads, head_size], got ",
              query.sizes(), " and ", key.sizes());
  const int64_t head_size = query.size(2);
  PAGEDSERVE_TRY(check_rows(query, op, "query", query.size(1), head_size));
  PAGEDSERVE_TRY(check_rows(key, op, "key", key.size(1), head_size));
  PAGEDSERVE_REQUIRE((query.scalar_type() == at::kHalf || query.scalar_type() == at::kBFloat16) &&
                  key.scalar_type() == query.scalar_type(),
              op, ": query and key must share a dtype, float16 or bfloat16, got ", query.scalar_type(), " and ",
              key.scalar_type());
  PAGEDSERVE_REQUIRE(positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                  positions.size(0) == query.size(0) && positions.is_contiguous(),
              op, ": positions must be a contiguous int64 [N=", query.size(0), "] tensor, got ",
              positions.scalar_type(), " ", positions.sizes());
  PAGEDSERVE_REQUIRE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_size, op, ": rotary_dim ", rotary_dim,
              " must be even and in (0, head_size=", head_size, "]");
  PAGEDSERVE_REQUIRE(cos_sin.scalar_type() == at::kFloat && cos_sin.dim() == 2 && cos_sin.size(1) == rotary_dim &&
                  cos_sin.is_contiguous(),
              op, ": cos_sin must be a contiguous float32 [P, ", rotary_dim, "] tensor, got ", cos_sin.scalar_type(),
              " ", cos_sin.sizes());
  rotary_embedding(positions, query, key, cos_sin, rotary_dim);
  return {};
}

std::string race_uniform_noise_checked(at::Tensor& out,              // [R, K] float32
                                       const at::Tensor& ids,        // [R, K] or [1, K] int64
                                       const at::Tensor& key_lo,     // [R] int64
                                       const at::Tensor& key_hi) {   // [R] int64
  constexpr const char* op = "race_uniform_noise";
  PAGEDSERVE_REQUIRE(out.is_cuda(), op, ": out must be a CUDA tensor, got one on ", out.device());
  for (const auto& [t, name] : {std::pair{&ids, "ids"}, std::pair{&key_lo, "key_lo"}, std::pair{&key_hi, "key_hi"}}) {
    PAGEDSERVE_TRY(check_cuda(*t, op, name, out.device(), "out"));
  }
  PAGEDSERVE_REQUIRE(out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous(), op,
              ": out must be a contiguous float32 [R, K] tensor, got ", out.scalar_type(), " ", out.sizes());
  const int64_t rows = out.size(0), num_ids = out.size(1);
  PAGEDSERVE_REQUIRE(rows <= 65535, op, ": at most 65535 rows per launch, got ", rows);
  PAGEDSERVE_REQUIRE(ids.scalar_type() == at::kLong && ids.dim() == 2 && (ids.size(0) == 1 || ids.size(0) == rows) &&
                  ids.size(1) == num_ids && ids.stride(1) == 1,
              op, ": ids must be an int64 [", rows, " or 1, ", num_ids, "] tensor with contiguous rows, got ",
              ids.scalar_type(), " ", ids.sizes());
  for (const auto& [t, name] : {std::pair{&key_lo, "key_lo"}, std::pair{&key_hi, "key_hi"}}) {
    PAGEDSERVE_REQUIRE(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == rows && t->is_contiguous(), op,
                ": ", name, " must be a contiguous int64 [R=", rows, "] tensor, got ", t->scalar_type(), " ",
                t->sizes());
  }
  race_uniform_noise(out, ids, key_lo, key_hi);
  return {};
}

}  // namespace pagedserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "PagedServe CUDA kernels: PagedAttention (decode and prefill), KV cache writes/copies and fused "
            "layers (RMSNorm, SwiGLU, rotary embedding), the sampler's race noise. Each "
            "function returns '' when it launched, else the problem with its arguments (nothing launched).";
  m.def("paged_attention", torch::wrap_pybind_function(pagedserve::paged_attention_checked),
        "PagedAttention of T query tokens over their paged context into `out` (decode when query_start_loc is "
        "None); partition_mode -1 auto, 0 never, 1 always split-K",
        py::arg("out"), py::arg("query"), py::arg("kv_cache"), py::arg("layer"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("query_start_loc"), py::arg("scale"), py::arg("max_seq_len"),
        py::arg("max_query_len"), py::arg("partition_mode") = -1);
  m.def("reshape_and_cache", torch::wrap_pybind_function(pagedserve::reshape_and_cache_checked), "Write new K/V of one layer into their slots",
        py::arg("key"), py::arg("value"), py::arg("kv_cache"), py::arg("layer"), py::arg("slot_mapping"));
  m.def("copy_blocks", torch::wrap_pybind_function(pagedserve::copy_blocks_checked), "Copy whole blocks src -> dst (copy-on-write)",
        py::arg("kv_cache"), py::arg("pairs"));
  m.def("rms_norm", torch::wrap_pybind_function(pagedserve::rms_norm_checked), "out = RMSNorm(input) * weight",
        py::arg("out"), py::arg("input"), py::arg("weight"), py::arg("eps"));
  m.def("fused_add_rms_norm", torch::wrap_pybind_function(pagedserve::fused_add_rms_norm_checked),
        "residual += input, then out = RMSNorm(residual) * weight", py::arg("out"), py::arg("input"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("silu_and_mul", torch::wrap_pybind_function(pagedserve::silu_and_mul_checked),
        "out = silu(gate) * up for input [gate | up]", py::arg("out"), py::arg("input"));
  m.def("rotary_embedding", torch::wrap_pybind_function(pagedserve::rotary_embedding_checked),
        "Neox-style rotary embedding of query and key in place", py::arg("positions"), py::arg("query"),
        py::arg("key"), py::arg("cos_sin"), py::arg("rotary_dim"));
  m.def("race_uniform_noise", torch::wrap_pybind_function(pagedserve::race_uniform_noise_checked),
        "The sampler's race noise x in (0, 1) of every (row key, token id), into `out`", py::arg("out"),
        py::arg("ids"), py::arg("key_lo"), py::arg("key_hi"));
}
