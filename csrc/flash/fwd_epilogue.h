// Forward epilogues: what a CTA does with its normalised fp32 output tile and per-row LSE.
//   store_output:      out (input dtype) and lse, for a plain attention call;
//   merge_output:      merge into a caller-owned fp32 running (out, lse), for a ring step;
//   merge_and_emit:    the same merge, but O' goes to out_final in the input dtype and is not written
//                      back (emit mode: the last contribution to these rows);
//   store_empty_tile:  a tile whose rows see no key at all: out = 0, lse = -inf;
//   emit_empty_tile:   such a tile in emit mode: out_final = (L == -inf ? 0 : O), state untouched.
// Every output tile belongs to exactly one CTA, so none of these need atomics.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"
#include "utils.h"

namespace ring_attn {
namespace flash {

using namespace cute;

// Writes acc_o (normalised, fp32, MMA accumulator layout) converted to the input dtype into the
// tile m_block of the (seqlen_q, kHeadDim) rows at `out` (row stride `row_stride`), staging it
// through shared memory (the Q buffer, no longer read: every warp passed the barrier after its last
// Q.K^T) so that global stores are 16-byte, row-contiguous and predicated per row. Contains a
// __syncthreads, so every thread of the CTA must call it.
template <class Traits, class AccO>
CUTE_DEVICE void store_tile(AccO const& acc_o, typename Traits::Element* out, int64_t row_stride, int seqlen_q,
                            typename Traits::Element* smem, int m_block) {
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDim = Traits::kHeadDim;
    const int tid = threadIdx.x;

    Tensor rO = convert_fragment<Element>(acc_o);
    Tensor sO = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});  // (kBlockM, kHeadDim)
    typename Traits::TiledMma tiled_mma;
    auto smem_store = make_tiled_copy_C(typename Traits::SmemStoreAtom{}, tiled_mma);
    auto smem_thr_store = smem_store.get_thread_slice(tid);
    copy(smem_store, smem_thr_store.retile_S(rO), smem_thr_store.partition_D(sO));
    __syncthreads();

    Tensor mO = make_tensor(make_gmem_ptr(out), make_shape(seqlen_q, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
    Tensor gO = local_tile(mO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
    typename Traits::GmemTiledStore gmem_store;
    auto gmem_thr_store = gmem_store.get_thread_slice(tid);
    Tensor tOsO = gmem_thr_store.partition_S(sO);  // (CPY, CPY_M, CPY_K)
    Tensor tOgO = gmem_thr_store.partition_D(gO);
    Tensor tOcO = gmem_thr_store.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    const int valid_rows = seqlen_q - m_block * kBlockM;
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tOgO); ++m) {
        if (get<0>(tOcO(0, m, 0)) < valid_rows) copy(gmem_store, tOsO(_, m, _), tOgO(_, m, _));
    }
}

// The (row, col) within the (kBlockM, kHeadDim) output tile of each value this thread holds in the
// MMA accumulator, indexed (kRowsPerThread, cols) like accumulator_rowcol's view of acc_o.
template <class Traits>
CUTE_DEVICE auto output_coordinates() {
    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(threadIdx.x);
    Tensor cO = thr_mma.partition_C(make_identity_tensor(Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{}));
    return make_tensor(cO.data(), accumulator_rowcol(cO.layout()));
}

// Writes the per-row LSE of the tile m_block to `lse_out` (this (batch, head)'s row of seqlen_q
// values): one lane per quad, the one holding column 0, writes each row.
template <class Traits>
CUTE_DEVICE void store_lse(const float (&lse)[Traits::kRowsPerThread], float* lse_out, int seqlen_q, int m_block) {
    Tensor cO_rc = output_coordinates<Traits>();
    if (get<1>(cO_rc(0, 0)) == 0) {
        CUTE_UNROLL
        for (int r = 0; r < Traits::kRowsPerThread; ++r) {
            const int row = m_block * Traits::kBlockM + get<0>(cO_rc(r, 0));
            if (row < seqlen_q) lse_out[row] = lse[r];
        }
    }
}

// out (input dtype) and lse of a plain attention call.
template <class Traits, class AccO>
CUTE_DEVICE void store_output(const FwdParams& p, AccO const& acc_o, const float (&lse)[Traits::kRowsPerThread],
                              typename Traits::Element* smem, int batch, int head, int m_block) {
    using Element = typename Traits::Element;
    Element* out = static_cast<Element*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
    store_tile<Traits>(acc_o, out, p.o_row_stride, p.seqlen_q, smem, m_block);
    store_lse<Traits>(lse, p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride, p.seqlen_q, m_block);
}

// The merge of a finite (o, l) into a finite running (O, L):
//     L' = max(L, l) + log1p(exp(min(L, l) - max(L, l))),   O' = w_old O + w_new o,
// with w_old = exp(L - L') and w_new = exp(l - L'). One function for both merge epilogues, so
// emitting a row gives exactly the rounding of what merging it would have stored.
struct MergeWeights {
    float w_old, w_new, lse;
};

CUTE_DEVICE MergeWeights merge_weights(float old_lse, float lse) {
    const float hi = fmaxf(old_lse, lse);
    const float lo = fminf(old_lse, lse);
    const float new_lse = hi + log1pf(expf(lo - hi));
    return {expf(old_lse - new_lse), expf(lse - new_lse), new_lse};
}

// Merges this call's (o, l) = (acc_o, lse) into the running fp32 state (O, L) at p.out / p.lse:
//     L' = max(L, l) + log1p(exp(min(L, l) - max(L, l))),   O' = exp(L - L') O + exp(l - L') o.
// l = -inf (the row saw no key in this call) leaves the row untouched; L = -inf (no contribution
// yet) takes (o, l) as they are, without reading O. Each thread updates the elements it holds in
// registers directly in global memory: an accumulator atom holds two neighbouring columns of a row,
// so every access is one 8-byte float2 (the host requires 8-byte aligned rows), and the four lanes
// of a quad together cover 32 contiguous bytes of the row.
template <class Traits, class AccO>
CUTE_DEVICE void merge_output(const FwdParams& p, AccO const& acc_o, const float (&lse)[Traits::kRowsPerThread],
                              int batch, int head, int m_block) {
    constexpr int kRows = Traits::kRowsPerThread;
    const int row0 = m_block * Traits::kBlockM;

    Tensor cO_rc = output_coordinates<Traits>();  // (kRows, cols) -> (row, col)
    Tensor o_rc = make_tensor(acc_o.data(), accumulator_rowcol(acc_o.layout()));
    static_assert(decltype(size<1>(o_rc))::value % 2 == 0, "columns come in pairs");

    float* running_out = static_cast<float*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
    float* running_lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;

    // Read every row's running L before any lane of the quad overwrites it.
    float old_lse[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cO_rc(r, 0));
        old_lse[r] = (row < p.seqlen_q && lse[r] != -INFINITY) ? running_lse[row] : -INFINITY;
    }
    __syncwarp();

    const bool writes_lse = get<1>(cO_rc(0, 0)) == 0;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cO_rc(r, 0));
        if (row >= p.seqlen_q || lse[r] == -INFINITY) continue;
        float* out_row = running_out + row * p.o_row_stride;
        float new_lse = lse[r], w_old = 0.f, w_new = 1.f;
        if (old_lse[r] != -INFINITY) {
            const MergeWeights w = merge_weights(old_lse[r], lse[r]);
            w_old = w.w_old, w_new = w.w_new, new_lse = w.lse;
        }
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o_rc); c += 2) {
            float2* dst = reinterpret_cast<float2*>(out_row + get<1>(cO_rc(r, c)));
            float2 value = make_float2(w_new * o_rc(r, c), w_new * o_rc(r, c + 1));
            if (old_lse[r] != -INFINITY) {
                const float2 old = *dst;
                value.x = fmaf(w_old, old.x, value.x);
                value.y = fmaf(w_old, old.y, value.y);
            }
            *dst = value;
        }
        if (writes_lse) running_lse[row] = new_lse;
    }
}

// Emit mode (FwdParams::out_final): merges (o, l) = (acc_o, lse) into the running (O, L) as
// merge_output does, but in registers, then writes O' in the input dtype to out_final through
// store_tile and L' to the running lse; the fp32 O' is not written back. Rows where l = -inf keep
// (O, L) and emit O; rows where L = -inf emit (o, l) without reading O (an empty row: o = 0,
// l = -inf, which finalize() produced). Every thread of the CTA must call it.
template <class Traits, class AccO>
CUTE_DEVICE void merge_and_emit(const FwdParams& p, AccO& acc_o, float (&lse)[Traits::kRowsPerThread],
                                typename Traits::Element* smem, int batch, int head, int m_block) {
    using Element = typename Traits::Element;
    constexpr int kRows = Traits::kRowsPerThread;
    const int row0 = m_block * Traits::kBlockM;

    Tensor cO_rc = output_coordinates<Traits>();  // (kRows, cols) -> (row, col)
    Tensor o_rc = make_tensor(acc_o.data(), accumulator_rowcol(acc_o.layout()));
    static_assert(decltype(size<1>(o_rc))::value % 2 == 0, "columns come in pairs");

    const float* running_out = static_cast<const float*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
    float* running_lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cO_rc(r, 0));
        const float old_lse = row < p.seqlen_q ? running_lse[row] : -INFINITY;
        if (old_lse == -INFINITY) continue;
        float w_old = 1.f, w_new = 0.f, new_lse = old_lse;  // l = -inf: the row keeps (O, L)
        if (lse[r] != -INFINITY) {
            const MergeWeights w = merge_weights(old_lse, lse[r]);
            w_old = w.w_old, w_new = w.w_new, new_lse = w.lse;
        }
        const float* out_row = running_out + row * p.o_row_stride;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o_rc); c += 2) {
            const float2 old = *reinterpret_cast<const float2*>(out_row + get<1>(cO_rc(r, c)));
            o_rc(r, c) = fmaf(w_old, old.x, w_new * o_rc(r, c));
            o_rc(r, c + 1) = fmaf(w_old, old.y, w_new * o_rc(r, c + 1));
        }
        lse[r] = new_lse;
    }
    // store_tile's barrier also orders every lane's read of the running lse above before the
    // writes below.
    Element* out_final = static_cast<Element*>(p.out_final) + batch * p.of_batch_stride + head * p.of_head_stride;
    store_tile<Traits>(acc_o, out_final, p.of_row_stride, p.seqlen_q, smem, m_block);
    store_lse<Traits>(lse, running_lse, p.seqlen_q, m_block);
}

// A tile none of whose rows sees a key: out = 0, lse = -inf (input-dtype output only; a merge
// leaves the running state alone).
template <class Traits>
CUTE_DEVICE void store_empty_tile(const FwdParams& p, int batch, int head, int m_block) {
    using Element = typename Traits::Element;
    constexpr int kChunksPerRow = Traits::kHeadDim / Traits::kElemsPerAccess;
    const int row0 = m_block * Traits::kBlockM;
    Element* out = static_cast<Element*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
    for (int idx = threadIdx.x; idx < Traits::kBlockM * kChunksPerRow; idx += Traits::kNThreads) {
        const int row = row0 + idx / kChunksPerRow;
        const int col = (idx % kChunksPerRow) * Traits::kElemsPerAccess;
        if (row < p.seqlen_q) *reinterpret_cast<uint4*>(out + row * p.o_row_stride + col) = make_uint4(0, 0, 0, 0);
    }
    float* lse_out = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;
    for (int r = threadIdx.x; r < Traits::kBlockM; r += Traits::kNThreads) {
        if (row0 + r < p.seqlen_q) lse_out[row0 + r] = -INFINITY;
    }
}

// Emit mode for a tile none of whose rows sees a key in this call: out_final = (L == -inf ? 0 :
// O rounded to the input dtype), the running state untouched. Also the whole of a call with
// seqlen_k = 0, which turns a running state into the final output. Each thread moves 16-byte
// chunks of out_final (kElemsPerAccess elements), loading kBatch chunks before storing any so that
// several loads are in flight.
template <class Traits>
CUTE_DEVICE void emit_empty_tile(const FwdParams& p, int batch, int head, int m_block) {
    using Element = typename Traits::Element;
    constexpr int kElems = Traits::kElemsPerAccess;
    constexpr int kChunksPerRow = Traits::kHeadDim / kElems;
    constexpr int kChunks = Traits::kBlockM * kChunksPerRow;
    constexpr int kBatch = 4;
    static_assert(kChunks % (kBatch * Traits::kNThreads) == 0, "whole batches of chunks per thread");
    const int row0 = m_block * Traits::kBlockM;
    const float* running_out = static_cast<const float*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
    const float* running_lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;
    Element* out_final = static_cast<Element*>(p.out_final) + batch * p.of_batch_stride + head * p.of_head_stride;
    cutlass::NumericArrayConverter<Element, float, kElems> convert;
    for (int first = threadIdx.x; first < kChunks; first += kBatch * Traits::kNThreads) {
        cutlass::Array<float, kElems> values[kBatch];
        CUTE_UNROLL
        for (int i = 0; i < kBatch; ++i) {
            const int chunk = first + i * Traits::kNThreads;
            const int row = row0 + chunk / kChunksPerRow;
            const int col = (chunk % kChunksPerRow) * kElems;
            values[i].fill(0.f);
            if (row < p.seqlen_q && running_lse[row] != -INFINITY) {
                const float* src = running_out + row * p.o_row_stride + col;
                CUTE_UNROLL
                for (int e = 0; e < kElems; e += 2) {
                    const float2 pair = *reinterpret_cast<const float2*>(src + e);
                    values[i][e] = pair.x;
                    values[i][e + 1] = pair.y;
                }
            }
        }
        CUTE_UNROLL
        for (int i = 0; i < kBatch; ++i) {
            const int chunk = first + i * Traits::kNThreads;
            const int row = row0 + chunk / kChunksPerRow;
            const int col = (chunk % kChunksPerRow) * kElems;
            if (row >= p.seqlen_q) continue;
            alignas(16) cutlass::Array<Element, kElems> converted = convert(values[i]);
            *reinterpret_cast<uint4*>(out_final + row * p.of_row_stride + col) =
                *reinterpret_cast<const uint4*>(&converted);
        }
    }
}

}  // namespace flash
}  // namespace ring_attn
