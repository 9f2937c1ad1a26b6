// The FlashAttention-2-style forward kernel: one CTA per (query block, batch, head); its warps
// split the query rows, so each warp runs its own online softmax without cross-warp traffic.
//
// Per key block n (visited from the last to the first, so the only sequence-tail block comes first):
//     wait K(n); barrier; start loading V(n)
//     S = Q K(n)^T                 (ldmatrix + mma.sync, Q and K from swizzled shared memory)
//     mask S (only blocks that cross a band edge or the end of the keys)
//     wait V(n); barrier; start loading K(n-1)
//     online softmax: P = exp2(S*scale_log2 - m*scale_log2), rescale O
//     O += P V(n)                  (P stays in registers as the A operand)
// K and V have one shared-memory buffer each: the load of V(n) overlaps Q.K^T and the load of
// K(n-1) overlaps the softmax and P.V. Masked (band) kernels visit only key blocks that intersect
// the band, so a causal call does about half the work of a full one.
//
// The blocks that need per-element masking sit at the two ends of the visited range (mask.h,
// unmasked_key_blocks), so the key loop runs in three phases: masked blocks at the high end (the key
// tail, a causal diagonal), then unmasked blocks with no mask code and no load predicates, then
// masked blocks at the low end (a window's lower edge). Each phase is its own loop over the same
// step, instantiated with and without masking, so the hot unmasked loop stays small.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"
#include "fwd_epilogue.h"
#include "fwd_traits.h"
#include "gemm_smem.h"
#include "mask.h"
#include "packed_sequences.h"
#include "softmax.h"
#include "utils.h"

namespace ring_attn {
namespace flash {

using namespace cute;

template <class Traits, bool kIsMasked>
CUTE_DEVICE void compute_fwd_tile(const FwdParams& p, int m_block, int batch, int head) {
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kHeadDim = Traits::kHeadDim;
    const int tid = threadIdx.x;
    const int row0 = m_block * kBlockM;

    const BlockRange blocks =
        key_blocks_for_rows<kBlockN, kIsMasked>(row0, min(row0 + kBlockM, p.seqlen_q), p.seqlen_k, p.mask);
    if (blocks.begin >= blocks.end) {
        // No row of the tile sees a key: a plain call stores zeros, a merge leaves the running
        // state alone, and emit mode still owes the tile's final output.
        if (!p.merge_into_accum) {
            store_empty_tile<Traits>(p, batch, head, m_block);
        } else if (p.out_final != nullptr) {
            emit_empty_tile<Traits>(p, batch, head, m_block);
        }
        return;
    }

    // Global tensors of this (batch, head): (seqlen, head_dim) with a runtime row stride.
    const int head_kv = head / (p.heads / p.heads_kv);
    const Element* q_ptr = static_cast<const Element*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
    const Element* k_ptr = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + head_kv * p.k_head_stride;
    const Element* v_ptr = static_cast<const Element*>(p.v) + batch * p.v_batch_stride + head_kv * p.v_head_stride;
    Tensor mQ = make_tensor(make_gmem_ptr(q_ptr), make_shape(p.seqlen_q, Int<kHeadDim>{}),
                            make_stride(p.q_row_stride, _1{}));
    Tensor mK = make_tensor(make_gmem_ptr(k_ptr), make_shape(p.seqlen_k, Int<kHeadDim>{}),
                            make_stride(p.k_row_stride, _1{}));
    Tensor mV = make_tensor(make_gmem_ptr(v_ptr), make_shape(p.seqlen_k, Int<kHeadDim>{}),
                            make_stride(p.v_row_stride, _1{}));
    Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));  // (BM, D)
    Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));        // (BN, D, n)
    Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));        // (BN, D, n)

    extern __shared__ __align__(128) char smem_raw[];
    Element* smem = reinterpret_cast<Element*>(smem_raw);
    Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});  // (D, BN) view of sV

    // Global -> shared (cp.async, zero fill past the sequence ends).
    typename Traits::GmemTiledLoad gmem_load;
    auto gmem_thr_load = gmem_load.get_thread_slice(tid);
    Tensor tQgQ = gmem_thr_load.partition_S(gQ);
    Tensor tQsQ = gmem_thr_load.partition_D(sQ);
    Tensor tKgK = gmem_thr_load.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
    Tensor tKsK = gmem_thr_load.partition_D(sK);
    Tensor tVgV = gmem_thr_load.partition_S(gV);
    Tensor tVsV = gmem_thr_load.partition_D(sV);
    Tensor tQcQ = gmem_thr_load.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor tKVcKV = gmem_thr_load.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

    // Tensor-core fragments and the ldmatrix copies that fill them.
    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(tid);
    Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // (MMA, MMA_M, MMA_K)
    Tensor tSrK = thr_mma.partition_fragment_B(sK);    // (MMA, MMA_N, MMA_K)
    Tensor tOrVt = thr_mma.partition_fragment_B(sVt);  // (MMA, MMA_D, MMA_N)
    Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(acc_o);

    auto smem_load_q = make_tiled_copy_A(typename Traits::SmemLoadAtom{}, tiled_mma);
    auto smem_thr_load_q = smem_load_q.get_thread_slice(tid);
    Tensor tSsQ = smem_thr_load_q.partition_S(sQ);
    auto smem_load_k = make_tiled_copy_B(typename Traits::SmemLoadAtom{}, tiled_mma);
    auto smem_thr_load_k = smem_load_k.get_thread_slice(tid);
    Tensor tSsK = smem_thr_load_k.partition_S(sK);
    auto smem_load_v = make_tiled_copy_B(typename Traits::SmemLoadAtomTransposed{}, tiled_mma);
    auto smem_thr_load_v = smem_load_v.get_thread_slice(tid);
    Tensor tOsVt = smem_thr_load_v.partition_S(sVt);

    // (row, col) of every score this thread holds, for masking.
    Tensor cS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));

    // Prologue: Q and the last key block (the only one that can extend past seqlen_k).
    copy_rows_zfill(gmem_load, tQgQ, tQsQ, tQcQ, p.seqlen_q - row0);
    const int last_col0 = (blocks.end - 1) * kBlockN;
    copy_rows_zfill(gmem_load, tKgK(_, _, _, blocks.end - 1), tKsK, tKVcKV, p.seqlen_k - last_col0);
    cp_async_fence();

    OnlineSoftmax<Traits::kRowsPerThread> softmax;
    // One key block. kMaskStep: the block may hold invisible scores or keys past seqlen_k.
    // always_inline: three loops call it, and nvcc kept it out of line for d = 256, which moved the
    // register fragments it captures to local memory.
    auto process_key_block = [&](auto mask_step, int n_block) __attribute__((always_inline)) {
        constexpr bool kMaskStep = decltype(mask_step)::value;
        const int col0 = n_block * kBlockN;
        Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
        clear(acc_s);

        cp_async_wait<0>();  // K(n) (and Q) landed
        __syncthreads();     // ... for every thread, and every warp is done with V(n+1)
        if constexpr (kMaskStep) {
            copy_rows_zfill(gmem_load, tVgV(_, _, _, n_block), tVsV, tKVcKV, p.seqlen_k - col0);
        } else {
            copy(gmem_load, tVgV(_, _, _, n_block), tVsV);
        }
        cp_async_fence();

        gemm_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, smem_load_q, smem_load_k);
        if constexpr (kMaskStep) apply_band_mask<kIsMasked>(acc_s, cS, row0, col0, p.seqlen_k, p.mask);

        cp_async_wait<0>();  // V(n) landed
        __syncthreads();     // ... for every thread, and every warp is done with K(n)
        if (n_block > blocks.begin) {
            // Only the last block reaches past seqlen_k, so K(n-1) needs no row predicate.
            copy(gmem_load, tKgK(_, _, _, n_block - 1), tKsK);
            cp_async_fence();
        }

        const bool is_first = n_block == blocks.end - 1;
        softmax.template update<kIsMasked && kMaskStep>(acc_s, acc_o, p.softmax_scale_log2, is_first);
        Tensor rP = convert_fragment<Element>(acc_s);
        Tensor tOrP = make_tensor(rP.data(), accumulator_as_operand_a(rP.layout()));
        gemm_reg_smem(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_load_v, smem_thr_load_v);
    };

    const BlockRange unmasked = unmasked_key_blocks<kBlockM, kBlockN, kIsMasked>(row0, p.seqlen_k, p.mask, blocks);
    int n_block = blocks.end - 1;
    CUTE_NO_UNROLL
    for (; n_block >= unmasked.end; --n_block) process_key_block(cute::true_type{}, n_block);
    CUTE_NO_UNROLL
    for (; n_block >= unmasked.begin; --n_block) process_key_block(cute::false_type{}, n_block);
    if constexpr (kIsMasked) {
        CUTE_NO_UNROLL
        for (; n_block >= blocks.begin; --n_block) process_key_block(cute::true_type{}, n_block);
    }

    float lse[Traits::kRowsPerThread];
    softmax.finalize(acc_o, p.softmax_scale, lse);
    if (!p.merge_into_accum) {
        store_output<Traits>(p, acc_o, lse, smem, batch, head, m_block);
    } else if (p.out_final != nullptr) {
        merge_and_emit<Traits>(p, acc_o, lse, smem, batch, head, m_block);
    } else {
        merge_output<Traits>(p, acc_o, lse, batch, head, m_block);
    }
}

// Grid: (query blocks, batch, heads). Masked kernels take query blocks from the last one down:
// under causal-like bands later rows see more keys, and starting the longest CTAs first shortens
// the tail of the launch.
template <class Traits, bool kIsMasked>
__global__ void __launch_bounds__(Traits::kNThreads, 1) flash_fwd_kernel(const __grid_constant__ FwdParams params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const int m_block = kIsMasked ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    compute_fwd_tile<Traits, kIsMasked>(params, m_block, blockIdx.y, blockIdx.z);
#endif
}

// The varlen forward (FwdParams::sequences): grid (query blocks of the longest query run, table
// entries, heads); each CTA works on its entry's rows as a batch of one, in the same query-block
// order as above, and CTAs past their entry's queries return at once.
template <class Traits, bool kIsMasked>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_packed_kernel(const __grid_constant__ FwdParams params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const FwdParams one =
        sequence_params<typename Traits::Element>(params, load_packed_sequence(params.sequences, blockIdx.y));
    const int m_blocks = (one.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
    if (int(blockIdx.x) >= m_blocks) return;
    const int m_block = kIsMasked ? m_blocks - 1 - int(blockIdx.x) : int(blockIdx.x);
    compute_fwd_tile<Traits, kIsMasked>(one, m_block, 0, blockIdx.z);
#endif
}

}  // namespace flash
}  // namespace ring_attn
