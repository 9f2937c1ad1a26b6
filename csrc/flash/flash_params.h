// Plain parameter structs shared by the host-side API (which knows torch) and the kernels (which do
// not). Pointers are untyped, strides are in elements, and every tensor is laid out
// (batch, seqlen, heads, head_dim) with a contiguous last dimension unless a comment says otherwise.
#pragma once

#include <cstdint>

namespace ring_attn {

// Which keys a query may see. Key j is visible to query i iff
//     key_offset_min <= j - i <= key_offset_max   (and 0 <= j < seqlen_k).
// Full attention, bottom-right causal, sliding windows and the ring's per-step masks (including
// "causal excluding the diagonal") are all one band. The host clamps both ends into
// [-seqlen_q, seqlen_k] so kernel index arithmetic cannot overflow int32, and sets
// `is_masked` to false when the band covers every (i, j) pair so the kernel skips mask code.
struct MaskBand {
    int key_offset_min;
    int key_offset_max;
    bool is_masked;
};

// Packed variable-length sequences (varlen): q, k and v hold many sequences back to back along
// their row dimension (batch stride unused), and a device table of PackedSequence, one per grid
// entry along the batch axis, says where each lies and which band its queries see. In a forward,
// entries may share keys (the two runs of one sequence's queries in the zigzag layout); in a
// backward they must not, since without GQA a key block's dK/dV add is not atomic. The caller builds the
// table (ring_attn_ext/packed_kernels.py) and the kernels trust it: rows inside the tensors, every
// sequence non-empty on both sides, the band clamped into [-seqlen_q, seqlen_k] of its sequence.
struct PackedSequence {
    int q_begin, q_end;  // query rows [q_begin, q_end)
    int k_begin, k_end;  // key rows [k_begin, k_end)
    int key_offset_min, key_offset_max;  // the band, as MaskBand's, within the sequence
};

struct FwdParams {
    const void* q;
    const void* k;
    const void* v;
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;

    // Output. When merge_into_accum is false: `out` has the input dtype and `lse` receives this
    // call's log-sum-exp; rows with no visible key get out = 0 and lse = -inf.
    // When merge_into_accum is true: `out` is a caller-owned fp32 running output and `lse` the
    // running log-sum-exp; the kernel merges this call's (o, l) into them in its epilogue
    // (L' = logaddexp(L, l); O' = exp(L - L') O + exp(l - L') o), treating -inf as "no
    // contribution". Rows with no visible key leave the running state untouched. O is read only
    // where L is finite and written whole where a finite l merges, so a row whose L is -inf may
    // hold anything (the running output need not be zero-filled).
    void* out;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    float* lse;  // (batch, heads, seqlen_q); the seqlen dimension is contiguous
    int64_t lse_batch_stride, lse_head_stride;
    bool merge_into_accum;

    // Emit mode (merge_into_accum only; nullptr: off). For the last contribution to a set of rows:
    // the kernel merges as above but writes O' rounded to the input dtype into out_final (same
    // shape as q, 16-byte aligned rows) instead of writing the fp32 O' back, and writes L' to
    // `lse`. Every row of the call gets out_final, including rows that see no key in this call:
    // there out_final = (L == -inf ? 0 : O rounded) and L stays. `out` is then only read, and only
    // in rows whose L is finite, so a running output that nothing merged into may be uninitialised.
    // With seqlen_k = 0 the call is a pure finish: out_final = (L == -inf ? 0 : O rounded).
    void* out_final;
    int64_t of_batch_stride, of_row_stride, of_head_stride;

    int batch, seqlen_q, seqlen_k, heads, heads_kv;
    int head_dim;  // must equal the launcher's compiled head dim
    float softmax_scale;        // usually head_dim^-0.5
    float softmax_scale_log2;   // softmax_scale * log2(e), for exp2-based softmax
    MaskBand mask;

    // Varlen (nullptr: a plain batch). Then `batch` counts the table's entries, seqlen_q and
    // seqlen_k are the longest query and key runs (they size the grid), `mask.is_masked` says
    // whether any entry's band masks, lse is (heads, total_q) (lse_batch_stride unused) and only
    // a plain call (no merge, no emit) is allowed.
    const PackedSequence* sequences;
};

struct BwdParams {
    const void* q;
    const void* k;
    const void* v;
    const void* out;   // the (global, in a ring) attention output, input dtype
    const void* dout;  // gradient of out, input dtype
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t do_batch_stride, do_row_stride, do_head_stride;

    // (batch, heads, seqlen_q) fp32, seqlen contiguous: the (global) log-sum-exp of the forward and
    // delta = rowsum(dout * out), computed once per backward by the preprocess kernel.
    const float* lse;
    float* delta;
    int64_t lse_batch_stride, lse_head_stride;
    int64_t delta_batch_stride, delta_head_stride;

    // Caller-owned fp32 accumulators; the kernel ADDS into them and never clears them (but see
    // dkv_overwrite below for dk/dv).
    // dq_accum: (batch, seqlen_q, heads, head_dim); dk_accum, dv_accum: (batch, seqlen_k, heads_kv,
    // head_dim). Several query heads share a kv head under GQA, so dk/dv adds must be atomic then.
    float* dq_accum;
    float* dk_accum;
    float* dv_accum;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

    // Plain backward (no ring) only, and only when heads == heads_kv: when dk_out is set, the kernel
    // WRITES dK and dV in the input dtype to dk_out / dv_out (laid out like k and v, strides in the
    // dk_* / dv_* fields above) instead of adding into dk_accum / dv_accum, so the caller needs no fp32
    // buffers, zero-fill or conversion for them. Keys that no query sees get zeros. nullptr: add.
    // The kernel writes them with 16-byte stores: base and strides must keep rows 16-byte aligned
    // (true of the fresh contiguous tensors flash_bwd allocates, the head dim being a multiple of 8).
    void* dk_out;
    void* dv_out;
    // Only when heads == heads_kv and dk_out is nullptr: the kernel WRITES its dK and dV over
    // dk_accum / dv_accum instead of adding to them (keys that no query sees get zeros), so a caller
    // whose first call on a set of key rows would add into zeros needs no zero-fill, and the epilogue
    // reads nothing.
    bool dkv_overwrite;

    int batch, seqlen_q, seqlen_k, heads, heads_kv;
    int head_dim;
    float softmax_scale;
    float softmax_scale_log2;
    MaskBand mask;

    // Varlen (nullptr: a plain batch), as in FwdParams; lse and delta are (heads, total_q), the
    // accumulators (total, heads, head_dim), and dQ is only added (dk_accum / dv_accum too: no
    // dk_out, no overwrite). packed_rows_q: total_q, the extent of dq_accum's rows.
    const PackedSequence* sequences;
    int packed_rows_q;
};

}  // namespace ring_attn
