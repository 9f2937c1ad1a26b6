#include "flash_api.h"
#include "check_message.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "flash/dq_tensor_map.h"
#include "flash/flash_bwd_preprocess.h"
#include "flash/flash_params.h"
#include "flash/kernel_registry.h"

namespace ring_attn {
namespace {

// The kernels move 16 bytes per thread, so rows must start on 16-byte boundaries.
constexpr int64_t kAlignmentBytes = 16;
// CUDA's limit on a grid's y and z dimensions.
constexpr int64_t kMaxGridYZ = 65535;

DType to_dtype(const at::Tensor& t, const char* name) {
    if (t.scalar_type() == at::kHalf) return DType::kFloat16;
    if (t.scalar_type() == at::kBFloat16) return DType::kBFloat16;
    RA_CHECK_TYPE(false, name, " must be float16 or bfloat16, got ", t.scalar_type());
}

void check_cuda_4d(const at::Tensor& t, const char* name, const at::Tensor& like_device) {
    RA_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor");
    RA_CHECK_VALUE(t.device() == like_device.device(), name, " must be on ", like_device.device(), ", got ",
                      t.device());
    RA_CHECK_VALUE(t.dim() == 4, name, " must have 4 dimensions (batch, seqlen, heads, head_dim), got shape ",
                      t.sizes());
    RA_CHECK_VALUE(t.stride(-1) == 1, name, " must have a contiguous last dimension (stride 1), got stride ",
                      t.stride(-1));
    const int64_t element_bytes = t.element_size();
    RA_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignmentBytes == 0, name,
                      " must start at a 16-byte aligned address");
    for (int dim = 0; dim < 3; ++dim) {
        RA_CHECK_VALUE((t.stride(dim) * element_bytes) % kAlignmentBytes == 0 || t.size(dim) == 1, name,
                          " stride ", t.stride(dim), " of dimension ", dim, " is not a multiple of 16 bytes");
    }
}

void check_fp32(const at::Tensor& t, const char* name, const at::Tensor& like_device) {
    RA_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    RA_CHECK_VALUE(t.is_cuda() && t.device() == like_device.device(), name, " must be on ",
                      like_device.device());
    RA_CHECK_VALUE(t.stride(-1) == 1, name, " must have a contiguous last dimension");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
    RA_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

struct Dims {
    int batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim;
};

Dims check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    check_cuda_4d(q, "q", q);
    check_cuda_4d(k, "k", q);
    check_cuda_4d(v, "v", q);
    RA_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                     "q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                     v.scalar_type());
    Dims d{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
           static_cast<int>(q.size(2)), static_cast<int>(k.size(2)), static_cast<int>(q.size(3))};
    RA_CHECK_VALUE(d.batch > 0, "batch size must be positive, got ", d.batch);
    RA_CHECK_VALUE(d.heads > 0, "q must have at least one head, got shape ", q.sizes());
    RA_CHECK_VALUE(d.heads_kv > 0 && d.heads % d.heads_kv == 0, "the number of heads in k and v (", d.heads_kv,
                      ") must divide the number of heads in q (", d.heads, ")");
    // Batch entries and heads run along gridDim.y and gridDim.z.
    RA_CHECK_VALUE(d.batch <= kMaxGridYZ && d.heads <= kMaxGridYZ, "batch (", d.batch, ") and heads of q (",
                   d.heads, ") must each be at most ", kMaxGridYZ);
    check_shape(k, "k", {d.batch, d.seqlen_k, d.heads_kv, d.head_dim});
    check_shape(v, "v", {d.batch, d.seqlen_k, d.heads_kv, d.head_dim});
    return d;
}

KernelKey kernel_key(const at::Tensor& q, const Dims& d, bool is_masked) {
    return KernelKey{d.head_dim, to_dtype(q, "q"), is_masked};
}

std::string head_dims_text() {
    std::string text;
    for (int dim : compiled_head_dims()) text += (text.empty() ? "" : ", ") + std::to_string(dim);
    return text.empty() ? "none" : text;
}

MaskBand make_mask_band(const Dims& d, std::optional<int64_t> lo, std::optional<int64_t> hi) {
    // j - i ranges over [-(seqlen_q - 1), seqlen_k - 1]; values past either end change nothing, so
    // clamping keeps kernel arithmetic in int32 without changing which keys are visible.
    const int64_t lo_limit = -static_cast<int64_t>(d.seqlen_q);
    const int64_t hi_limit = static_cast<int64_t>(d.seqlen_k);
    const int64_t lo_value = std::clamp<int64_t>(lo.value_or(lo_limit), lo_limit, hi_limit);
    const int64_t hi_value = std::clamp<int64_t>(hi.value_or(hi_limit), lo_limit, hi_limit);
    MaskBand band;
    band.key_offset_min = static_cast<int>(lo_value);
    band.key_offset_max = static_cast<int>(hi_value);
    band.is_masked = !(lo_value <= -(d.seqlen_q - 1) && hi_value >= d.seqlen_k - 1);
    return band;
}

template <typename Params>
void fill_common(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Dims& d,
                 double softmax_scale, const MaskBand& band) {
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
    p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
    p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
    p.batch = d.batch, p.seqlen_q = d.seqlen_q, p.seqlen_k = d.seqlen_k;
    p.heads = d.heads, p.heads_kv = d.heads_kv, p.head_dim = d.head_dim;
    p.softmax_scale = static_cast<float>(softmax_scale);
    p.softmax_scale_log2 = static_cast<float>(softmax_scale * M_LOG2E);
    p.mask = band;
}

FwdLauncher fwd_launcher_for(const at::Tensor& q, const Dims& d, const MaskBand& band) {
    FwdLauncher launcher = find_fwd_launcher(kernel_key(q, d, band.is_masked));
    RA_CHECK_VALUE(launcher != nullptr, "head_dim ", d.head_dim, " with dtype ", q.scalar_type(),
                      " is not supported by this build; compiled head dims: ", head_dims_text());
    return launcher;
}

BwdLauncher bwd_launcher_for(const at::Tensor& q, const Dims& d, const MaskBand& band) {
    BwdLauncher launcher = find_bwd_launcher(kernel_key(q, d, band.is_masked));
    RA_CHECK_VALUE(launcher != nullptr, "backward for head_dim ", d.head_dim, " with dtype ",
                      q.scalar_type(), " is not supported by this build; compiled head dims: ",
                      head_dims_text());
    return launcher;
}

void check_scale(double softmax_scale) {
    RA_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be a positive finite "
                      "number, got ", softmax_scale);
}

FwdParams make_fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Dims& d,
                          double softmax_scale, const MaskBand& band, at::Tensor& out, at::Tensor& lse,
                          bool merge) {
    FwdParams p{};
    fill_common(p, q, k, v, d, softmax_scale, band);
    p.out = out.data_ptr();
    p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
    p.lse = lse.data_ptr<float>();
    p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
    p.merge_into_accum = merge;
    return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             double softmax_scale, std::optional<int64_t> key_offset_min,
                                             std::optional<int64_t> key_offset_max) {
    const Dims d = check_qkv(q, k, v);
    check_scale(softmax_scale);
    const MaskBand band = make_mask_band(d, key_offset_min, key_offset_max);
    FwdLauncher launcher = fwd_launcher_for(q, d, band);
    c10::cuda::CUDAGuard guard(q.device());
    at::Tensor out = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor lse = at::empty({d.batch, d.heads, d.seqlen_q}, q.options().dtype(at::kFloat));
    if (d.seqlen_q == 0) return {out, lse};
    if (d.seqlen_k == 0) {
        out.zero_();
        lse.fill_(-std::numeric_limits<float>::infinity());
        return {out, lse};
    }
    FwdParams p = make_fwd_params(q, k, v, d, softmax_scale, band, out, lse, /*merge=*/false);
    launcher(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {out, lse};
}

void flash_fwd_merge(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out_accum,
                     at::Tensor& lse_accum, double softmax_scale, std::optional<int64_t> key_offset_min,
                     std::optional<int64_t> key_offset_max, const std::optional<at::Tensor>& out_final) {
    const Dims d = check_qkv(q, k, v);
    check_scale(softmax_scale);
    check_fp32(out_accum, "out_accum", q);
    check_fp32(lse_accum, "lse_accum", q);
    check_shape(out_accum, "out_accum", {d.batch, d.seqlen_q, d.heads, d.head_dim});
    check_shape(lse_accum, "lse_accum", {d.batch, d.heads, d.seqlen_q});
    // The merge epilogue reads and writes out_accum two floats (8 bytes) at a time.
    RA_CHECK_VALUE(reinterpret_cast<uintptr_t>(out_accum.data_ptr()) % 8 == 0,
                   "out_accum must start at an 8-byte aligned address");
    for (int dim = 0; dim < 3; ++dim) {
        RA_CHECK_VALUE(out_accum.stride(dim) % 2 == 0 || out_accum.size(dim) == 1, "out_accum stride ",
                       out_accum.stride(dim), " of dimension ", dim, " must be even (8-byte aligned rows)");
    }
    if (out_final.has_value()) {
        check_cuda_4d(*out_final, "out_final", q);  // 16-byte aligned rows, as any input-dtype output
        RA_CHECK_TYPE(out_final->scalar_type() == q.scalar_type(), "out_final must have the dtype of q (",
                      q.scalar_type(), "), got ", out_final->scalar_type());
        check_shape(*out_final, "out_final", q.sizes());
    }
    const MaskBand band = make_mask_band(d, key_offset_min, key_offset_max);
    FwdLauncher launcher = fwd_launcher_for(q, d, band);
    // Without keys a plain merge changes nothing; emit mode still writes out_final.
    if (d.seqlen_q == 0 || (d.seqlen_k == 0 && !out_final.has_value())) return;
    c10::cuda::CUDAGuard guard(q.device());
    FwdParams p = make_fwd_params(q, k, v, d, softmax_scale, band, out_accum, lse_accum, /*merge=*/true);
    if (out_final.has_value()) {
        p.out_final = out_final->data_ptr();
        p.of_batch_stride = out_final->stride(0), p.of_row_stride = out_final->stride(1);
        p.of_head_stride = out_final->stride(2);
    }
    launcher(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace {

// The checks every backward entry point makes of dout and lse (q, k, v are checked by check_qkv).
void check_dout_lse(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& lse, const Dims& d) {
    check_cuda_4d(dout, "dout", q);
    check_shape(dout, "dout", q.sizes());
    RA_CHECK_TYPE(dout.scalar_type() == q.scalar_type(), "dout must have the dtype of q");
    check_fp32(lse, "lse", q);
    check_shape(lse, "lse", {d.batch, d.heads, d.seqlen_q});
}

// Inputs, strides and mask of a backward call; the destinations of dq, dk and dv are set by the caller.
BwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& lse, const at::Tensor& delta, const Dims& d, double softmax_scale,
                          const MaskBand& band) {
    BwdParams p{};
    fill_common(p, q, k, v, d, softmax_scale, band);
    p.dout = dout.data_ptr();
    p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
    p.lse = lse.data_ptr<float>();
    p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
    p.delta = const_cast<float*>(delta.data_ptr<float>());
    p.delta_batch_stride = delta.stride(0), p.delta_head_stride = delta.stride(1);
    return p;
}

void set_dq_accum(BwdParams& p, const at::Tensor& dq_accum) {
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dq_batch_stride = dq_accum.stride(0), p.dq_row_stride = dq_accum.stride(1);
    p.dq_head_stride = dq_accum.stride(2);
}

// The Hopper kernels add dQ through the TMA, which needs 16-byte aligned rows; an accumulator
// without them gets a zeroed aligned temporary instead (returned; undefined when not needed), whose
// sum the caller adds to it after the launch.
at::Tensor set_dq_accum_or_staging(BwdParams& p, const at::Tensor& dq_accum) {
    set_dq_accum(p, dq_accum);
    if (dq_accum_tma_aligned(p)) return {};
    at::Tensor staging = at::zeros(dq_accum.sizes(), dq_accum.options());
    set_dq_accum(p, staging);
    return staging;
}

// dk/dv strides of either destination (fp32 accumulators or dtype outputs).
void set_dkv_strides(BwdParams& p, const at::Tensor& dk, const at::Tensor& dv) {
    p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
    p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
}

// The delta kernel's own fields: out and dout of the forward's output rows, delta to write.
void set_delta_inputs(BwdParams& p, const at::Tensor& dout, const at::Tensor& out, at::Tensor& delta) {
    p.out = out.data_ptr();
    p.dout = dout.data_ptr();
    p.o_batch_stride = out.stride(0), p.o_row_stride = out.stride(1), p.o_head_stride = out.stride(2);
    p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
    p.delta = delta.data_ptr<float>();
    p.delta_batch_stride = delta.stride(0), p.delta_head_stride = delta.stride(1);
    p.batch = out.size(0), p.seqlen_q = out.size(1), p.heads = out.size(2), p.head_dim = out.size(3);
}

void check_out_dout(const at::Tensor& dout, const at::Tensor& out) {
    check_cuda_4d(out, "out", out);
    check_cuda_4d(dout, "dout", out);
    check_shape(dout, "dout", out.sizes());
    RA_CHECK_TYPE(dout.scalar_type() == out.scalar_type(), "dout must have the dtype of out (",
                     out.scalar_type(), "), got ", dout.scalar_type());
}

}  // namespace

at::Tensor flash_bwd_delta(const at::Tensor& dout, const at::Tensor& out, const std::optional<at::Tensor>& dq_accum) {
    check_out_dout(dout, out);
    if (dq_accum.has_value()) {
        check_fp32(*dq_accum, "dq_accum", out);
        check_shape(*dq_accum, "dq_accum", out.sizes());
    }
    const DType dtype = to_dtype(out, "out");
    c10::cuda::CUDAGuard guard(out.device());
    at::Tensor delta = at::empty({out.size(0), out.size(2), out.size(1)}, out.options().dtype(at::kFloat));
    if (out.size(1) == 0) return delta;
    BwdParams p{};
    set_delta_inputs(p, dout, out, delta);
    if (dq_accum.has_value()) set_dq_accum(p, *dq_accum);
    launch_bwd_delta(p, dtype, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return delta;
}

void flash_bwd_accumulate(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_accum,
                          at::Tensor& dk_accum, at::Tensor& dv_accum, double softmax_scale,
                          std::optional<int64_t> key_offset_min, std::optional<int64_t> key_offset_max,
                          bool dkv_overwrite) {
    const Dims d = check_qkv(q, k, v);
    check_scale(softmax_scale);
    check_dout_lse(dout, q, lse, d);
    check_fp32(delta, "delta", q);
    check_shape(delta, "delta", {d.batch, d.heads, d.seqlen_q});
    check_fp32(dq_accum, "dq_accum", q);
    check_fp32(dk_accum, "dk_accum", q);
    check_fp32(dv_accum, "dv_accum", q);
    check_shape(dq_accum, "dq_accum", q.sizes());
    check_shape(dk_accum, "dk_accum", k.sizes());
    check_shape(dv_accum, "dv_accum", v.sizes());
    RA_CHECK_VALUE(!dkv_overwrite || d.heads == d.heads_kv,
                   "dkv_overwrite needs heads == heads_kv (under GQA several query heads add into one kv "
                   "head's dk/dv), got heads ", d.heads, " and heads_kv ", d.heads_kv);
    const MaskBand band = make_mask_band(d, key_offset_min, key_offset_max);
    BwdLauncher launcher = bwd_launcher_for(q, d, band);
    if (d.seqlen_k == 0) return;
    if (d.seqlen_q == 0) {
        // No query: the gradients of these keys are zero, which overwriting must leave behind.
        if (dkv_overwrite) {
            dk_accum.zero_();
            dv_accum.zero_();
        }
        return;
    }
    c10::cuda::CUDAGuard guard(q.device());
    BwdParams p = make_bwd_params(dout, q, k, v, lse, delta, d, softmax_scale, band);
    const at::Tensor dq_staging = set_dq_accum_or_staging(p, dq_accum);
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    p.dkv_overwrite = dkv_overwrite;
    set_dkv_strides(p, dk_accum, dv_accum);
    launcher(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (dq_staging.defined()) dq_accum.add_(dq_staging);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                         const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         double softmax_scale,
                                                         std::optional<int64_t> key_offset_min,
                                                         std::optional<int64_t> key_offset_max) {
    const Dims d = check_qkv(q, k, v);
    check_scale(softmax_scale);
    check_dout_lse(dout, q, lse, d);
    check_out_dout(dout, out);
    const MaskBand band = make_mask_band(d, key_offset_min, key_offset_max);
    BwdLauncher launcher = bwd_launcher_for(q, d, band);
    c10::cuda::CUDAGuard guard(q.device());
    if (d.seqlen_q == 0 || d.seqlen_k == 0) {
        return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
                at::zeros(v.sizes(), v.options())};
    }
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const auto fp32 = q.options().dtype(at::kFloat);

    // dq sums over key blocks (fp32 atomics or TMA reductions); the delta kernel zero-fills the
    // accumulator in the same pass that computes delta.
    at::Tensor dq_accum = at::empty(q.sizes(), fp32);
    const at::Tensor delta = flash_bwd_delta(dout, out, dq_accum);
    BwdParams p = make_bwd_params(dout, q, k, v, lse, delta, d, softmax_scale, band);
    set_dq_accum(p, dq_accum);

    if (d.heads == d.heads_kv) {
        // Each dK/dV tile has one owner CTA, which writes it in the input dtype: no fp32 buffers.
        at::Tensor dk = at::empty(k.sizes(), k.options());
        at::Tensor dv = at::empty(v.sizes(), v.options());
        p.dk_out = dk.data_ptr();
        p.dv_out = dv.data_ptr();
        set_dkv_strides(p, dk, dv);
        launcher(p, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return {dq_accum.to(q.scalar_type()), dk, dv};
    }
    // GQA: the query heads of a group add into one kv head's fp32 accumulators.
    at::Tensor dk_accum = at::zeros(k.sizes(), fp32);
    at::Tensor dv_accum = at::zeros(v.sizes(), fp32);
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    set_dkv_strides(p, dk_accum, dv_accum);
    launcher(p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dq_accum.to(q.scalar_type()), dk_accum.to(k.scalar_type()), dv_accum.to(v.scalar_type())};
}

namespace {

// The varlen entry points' shared checks. Returns the dims of q, k and v as a batch of one (seqlen_q
// = total_q) with the launch's grid sizes in place of batch and the sequence lengths.
Dims check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sequences,
                  int64_t max_seqlen_q, int64_t max_seqlen_k) {
    for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
        RA_CHECK_VALUE(t->dim() == 3, name, " must have 3 dimensions (total_tokens, heads, head_dim), got shape ",
                       t->sizes());
    }
    Dims d = check_qkv(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0));
    RA_CHECK_TYPE(sequences.scalar_type() == at::kInt, "sequences must be int32, got ", sequences.scalar_type());
    RA_CHECK_VALUE(sequences.is_cuda() && sequences.device() == q.device(), "sequences must be on ", q.device());
    RA_CHECK_VALUE(sequences.dim() == 2 && sequences.size(1) == 6 && sequences.is_contiguous(),
                   "sequences must be a contiguous (n, 6) table, got shape ", sequences.sizes());
    // The entries run along gridDim.y.
    RA_CHECK_VALUE(sequences.size(0) <= kMaxGridYZ, "a varlen launch takes at most ", kMaxGridYZ,
                   " sequences, got ", sequences.size(0));
    // The grid's x dimension counts blocks of max_seqlen_q rows; a launch with entries needs some.
    RA_CHECK_VALUE(sequences.size(0) == 0 || (max_seqlen_q >= 1 && max_seqlen_k >= 1),
                   "max_seqlen_q and max_seqlen_k must be at least 1 when sequences has entries, got ",
                   max_seqlen_q, " and ", max_seqlen_k);
    RA_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_q <= d.seqlen_q, "max_seqlen_q (", max_seqlen_q,
                   ") must lie in [0, total_q = ", d.seqlen_q, "]");
    RA_CHECK_VALUE(max_seqlen_k >= 0 && max_seqlen_k <= d.seqlen_k, "max_seqlen_k (", max_seqlen_k,
                   ") must lie in [0, total_k = ", d.seqlen_k, "]");
    return d;
}

// The launch-wide fields of a varlen call: grid sizes, kernel kind, the table.
template <typename Params>
void set_varlen(Params& p, const at::Tensor& sequences, int64_t max_seqlen_q, int64_t max_seqlen_k,
                bool is_masked) {
    p.batch = static_cast<int>(sequences.size(0));
    p.seqlen_q = static_cast<int>(max_seqlen_q);
    p.seqlen_k = static_cast<int>(max_seqlen_k);
    p.mask = MaskBand{0, 0, is_masked};  // each entry brings its own band
    p.sequences = reinterpret_cast<const PackedSequence*>(sequences.data_ptr<int32_t>());
}

}  // namespace

void flash_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                      at::Tensor& lse, const at::Tensor& sequences, int64_t max_seqlen_q, int64_t max_seqlen_k,
                      double softmax_scale, bool is_masked) {
    const Dims d = check_varlen(q, k, v, sequences, max_seqlen_q, max_seqlen_k);
    check_scale(softmax_scale);
    check_cuda_4d(out.unsqueeze(0), "out", q);
    RA_CHECK_TYPE(out.scalar_type() == q.scalar_type(), "out must have the dtype of q");
    check_shape(out, "out", q.sizes());
    check_fp32(lse, "lse", q);
    check_shape(lse, "lse", {d.heads, d.seqlen_q});
    const MaskBand kind{0, 0, is_masked};
    FwdLauncher launcher = fwd_launcher_for(q, d, kind);
    if (sequences.size(0) == 0) return;
    c10::cuda::CUDAGuard guard(q.device());
    at::Tensor out_rows = out.unsqueeze(0), lse_rows = lse.unsqueeze(0);
    FwdParams p = make_fwd_params(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), d, softmax_scale, kind, out_rows,
                                  lse_rows, /*merge=*/false);
    set_varlen(p, sequences, max_seqlen_q, max_seqlen_k, is_masked);
    launcher(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void flash_varlen_bwd_accumulate(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                                 at::Tensor& dq_accum, at::Tensor& dk_accum, at::Tensor& dv_accum,
                                 const at::Tensor& sequences, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 double softmax_scale, bool is_masked) {
    const Dims d = check_varlen(q, k, v, sequences, max_seqlen_q, max_seqlen_k);
    check_scale(softmax_scale);
    check_cuda_4d(dout.unsqueeze(0), "dout", q);
    check_shape(dout, "dout", q.sizes());
    RA_CHECK_TYPE(dout.scalar_type() == q.scalar_type(), "dout must have the dtype of q");
    for (const auto& [t, name] : {std::pair{&lse, "lse"}, std::pair{&delta, "delta"}}) {
        check_fp32(*t, name, q);
        check_shape(*t, name, {d.heads, d.seqlen_q});
    }
    for (const auto& [t, name, like] : {std::tuple{&dq_accum, "dq_accum", &q}, std::tuple{&dk_accum, "dk_accum", &k},
                                        std::tuple{&dv_accum, "dv_accum", &v}}) {
        check_fp32(*t, name, q);
        check_shape(*t, name, like->sizes());
    }
    // One dQ descriptor spans every packed row, so its rows must follow each other.
    RA_CHECK_VALUE(dq_accum.is_contiguous(), "dq_accum must be contiguous");
    const MaskBand kind{0, 0, is_masked};
    BwdLauncher launcher = bwd_launcher_for(q, d, kind);
    if (sequences.size(0) == 0) return;
    c10::cuda::CUDAGuard guard(q.device());
    BwdParams p = make_bwd_params(dout.unsqueeze(0), q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                  lse.unsqueeze(0), delta.unsqueeze(0), d, softmax_scale, kind);
    const at::Tensor dq_staging = set_dq_accum_or_staging(p, dq_accum.unsqueeze(0));
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    set_dkv_strides(p, dk_accum.unsqueeze(0), dv_accum.unsqueeze(0));
    p.packed_rows_q = d.seqlen_q;
    set_varlen(p, sequences, max_seqlen_q, max_seqlen_k, is_masked);
    launcher(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (dq_staging.defined()) dq_accum.add_(dq_staging.squeeze(0));
}

std::vector<int64_t> supported_head_dims() {
    std::vector<int64_t> dims;
    for (int dim : compiled_head_dims()) dims.push_back(dim);
    return dims;
}

std::vector<std::tuple<std::string, int64_t, std::string, bool>> compiled_kernel_list() {
    std::vector<std::tuple<std::string, int64_t, std::string, bool>> list;
    for (const CompiledKernel& kernel : compiled_kernels()) {
        list.emplace_back(kernel.direction, kernel.head_dim, kernel.dtype, kernel.is_masked);
    }
    return list;
}

}  // namespace ring_attn
