// Torch-facing entry points of the single-GPU kernels: argument checks, allocation, parameter
// structs and dispatch to the compiled instantiation. The ring scheduler calls these too, on
// whatever stream is current.
//
// Masks are bands of key offsets: key j is visible to query i iff
// key_offset_min <= j - i <= key_offset_max; std::nullopt means unbounded on that side.
// Causal with bottom-right alignment is (nullopt, seqlen_k - seqlen_q).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace ring_attn {

// out (input dtype, (b, s_q, h, d)) and lse (fp32, (b, h, s_q)); rows with no visible key get
// out = 0 and lse = -inf.
std::tuple<at::Tensor, at::Tensor> flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             double softmax_scale, std::optional<int64_t> key_offset_min,
                                             std::optional<int64_t> key_offset_max);

// Merges this block's attention into a running fp32 state in place: out_accum (b, s_q, h, d) fp32
// and lse_accum (b, h, s_q) fp32, both possibly strided views (last dimension contiguous). A row
// whose running lse is -inf holds no contribution yet, and its out_accum row is never read (it may
// be uninitialised).
// Emit mode, for the last contribution to these rows: with out_final ((b, s_q, h, d), q's dtype,
// last dimension contiguous, 16-byte aligned rows) the merged output goes to out_final in q's dtype
// instead of back into out_accum (which is then only read); lse_accum still receives the merged
// lse. Every row gets out_final: a row that sees no key in this call gets its running output
// (0 where the running lse is -inf). With no keys at all (seqlen_k = 0) the call only does that.
void flash_fwd_merge(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out_accum,
                     at::Tensor& lse_accum, double softmax_scale, std::optional<int64_t> key_offset_min,
                     std::optional<int64_t> key_offset_max,
                     const std::optional<at::Tensor>& out_final = std::nullopt);

// delta = rowsum(dout * out) in fp32, (b, h, s_q): the same for every block of a ring backward.
// With dq_accum (fp32, out's shape, any strides with the last dimension contiguous) the same pass
// also zero-fills it, so that a backward's dQ accumulator needs no fill of its own.
at::Tensor flash_bwd_delta(const at::Tensor& dout, const at::Tensor& out,
                           const std::optional<at::Tensor>& dq_accum = std::nullopt);

// Adds this block's gradients into caller-owned fp32 accumulators: dq_accum (b, s_q, h, d),
// dk_accum and dv_accum (b, s_k, h_kv, d). lse and delta are the (global) (b, h, s_q) fp32 tensors.
// dkv_overwrite (heads == heads_kv only): dk_accum and dv_accum are written, not added to, every
// element of them (zeros for keys that no query sees), so they need no zero-fill and their old
// contents are never read. dq_accum is always added to.
void flash_bwd_accumulate(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_accum,
                          at::Tensor& dk_accum, at::Tensor& dv_accum, double softmax_scale,
                          std::optional<int64_t> key_offset_min, std::optional<int64_t> key_offset_max,
                          bool dkv_overwrite = false);

// Plain backward: (dq, dk, dv) in the input dtype. dq accumulates in an fp32 buffer that the delta
// kernel zero-fills; without GQA the kernel writes dk and dv directly in the input dtype (with GQA
// they accumulate in fp32 and are converted at the end).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                         const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         double softmax_scale,
                                                         std::optional<int64_t> key_offset_min,
                                                         std::optional<int64_t> key_offset_max);

// Packed variable-length sequences, one launch for all of them. q (total_q, h, d), k and v
// (total_k, h_kv, d); `sequences` an int32 (n, 6) CUDA tensor of PackedSequence entries
// (q_begin, q_end, k_begin, k_end, key_offset_min, key_offset_max) per row (flash/flash_params.h),
// which the caller builds and the kernels trust (ring_attn_ext/packed_kernels.py); max_seqlen_q and
// max_seqlen_k: the longest query and key run of the table; is_masked: whether any entry's band
// hides a key from a query of its entry.
// Forward: writes the entries' rows of out (total_q, h, d, q's dtype) and lse (h, total_q, fp32);
// rows of no entry keep what they hold.
void flash_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                      at::Tensor& lse, const at::Tensor& sequences, int64_t max_seqlen_q, int64_t max_seqlen_k,
                      double softmax_scale, bool is_masked);

// Backward: adds the entries' gradients into fp32 dq_accum (total_q, h, d, contiguous), dk_accum and
// dv_accum (total_k, h_kv, d, last dimension contiguous). lse and delta are (h, total_q) fp32 (delta
// from flash_bwd_delta on the packed rows as a batch of one). Entries of one call must not share keys.
void flash_varlen_bwd_accumulate(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                                 at::Tensor& dq_accum, at::Tensor& dk_accum, at::Tensor& dv_accum,
                                 const at::Tensor& sequences, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 double softmax_scale, bool is_masked);

// Head dims this build compiled (RING_ATTN_HEAD_DIMS at build time).
std::vector<int64_t> supported_head_dims();

// (direction "fwd"/"bwd", head_dim, dtype "float16"/"bfloat16", is_masked) for every compiled kernel.
std::vector<std::tuple<std::string, int64_t, std::string, bool>> compiled_kernel_list();

}  // namespace ring_attn
