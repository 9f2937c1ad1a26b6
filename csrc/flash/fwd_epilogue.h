// Forward epilogues: what a CTA does with its normalised fp32 output tile and per-row LSE.
//   store_output:      out (input dtype) and lse, for a plain attention call;
//   merge_output:      merge into a caller-owned fp32 running (out, lse), for a ring step;
//   store_empty_tile:  a tile whose rows see no key at all: out = 0, lse = -inf.
// Every output tile belongs to exactly one CTA, so none of these need atomics.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"
#include "utils.h"

namespace ring_attn {
namespace flash {

using namespace cute;

// Writes acc_o (normalised, fp32, MMA accumulator layout) converted to the input dtype, staging it
// through shared memory (the Q buffer, no longer read: every warp passed the barrier after its last
// Q.K^T) so that global stores are 16-byte, row-contiguous and predicated per row.
template <class Traits, class AccO>
CUTE_DEVICE void store_output(const FwdParams& p, AccO const& acc_o, const float (&lse)[Traits::kRowsPerThread],
                              typename Traits::Element* smem, int batch, int head, int m_block) {
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDim = Traits::kHeadDim;
    const int tid = threadIdx.x;
    const int row0 = m_block * kBlockM;

    Tensor rO = convert_fragment<Element>(acc_o);
    Tensor sO = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});  // (kBlockM, kHeadDim)
    typename Traits::TiledMma tiled_mma;
    auto smem_store = make_tiled_copy_C(typename Traits::SmemStoreAtom{}, tiled_mma);
    auto smem_thr_store = smem_store.get_thread_slice(tid);
    copy(smem_store, smem_thr_store.retile_S(rO), smem_thr_store.partition_D(sO));
    __syncthreads();

    Element* out = static_cast<Element*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
    Tensor mO = make_tensor(make_gmem_ptr(out), make_shape(p.seqlen_q, Int<kHeadDim>{}),
                            make_stride(p.o_row_stride, _1{}));
    Tensor gO = local_tile(mO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
    typename Traits::GmemTiledStore gmem_store;
    auto gmem_thr_store = gmem_store.get_thread_slice(tid);
    Tensor tOsO = gmem_thr_store.partition_S(sO);  // (CPY, CPY_M, CPY_K)
    Tensor tOgO = gmem_thr_store.partition_D(gO);
    Tensor tOcO = gmem_thr_store.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    const int valid_rows = p.seqlen_q - row0;
    CUTE_UNROLL
    for (int m = 0; m < size<1>(tOgO); ++m) {
        if (get<0>(tOcO(0, m, 0)) < valid_rows) copy(gmem_store, tOsO(_, m, _), tOgO(_, m, _));
    }

    // One lane per quad (the one holding column 0) writes each row's LSE.
    auto thr_mma = tiled_mma.get_thread_slice(tid);
    Tensor cO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor cO_rc = make_tensor(cO.data(), accumulator_rowcol(cO.layout()));
    if (get<1>(cO_rc(0, 0)) == 0) {
        float* lse_out = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;
        CUTE_UNROLL
        for (int r = 0; r < Traits::kRowsPerThread; ++r) {
            const int row = row0 + get<0>(cO_rc(r, 0));
            if (row < p.seqlen_q) lse_out[row] = lse[r];
        }
    }
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
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kHeadDim = Traits::kHeadDim;
    const int row0 = m_block * kBlockM;

    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(threadIdx.x);
    Tensor cO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor cO_rc = make_tensor(cO.data(), accumulator_rowcol(cO.layout()));  // (kRows, cols) -> (row, col)
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
            const float hi = fmaxf(old_lse[r], lse[r]);
            const float lo = fminf(old_lse[r], lse[r]);
            new_lse = hi + log1pf(expf(lo - hi));
            w_old = expf(old_lse[r] - new_lse);
            w_new = expf(lse[r] - new_lse);
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

}  // namespace flash
}  // namespace ring_attn
