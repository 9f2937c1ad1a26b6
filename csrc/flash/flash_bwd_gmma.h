// The backward CTA body on Hopper warpgroup MMA (wgmma), for the head dims BwdGmmaTraits covers:
// the same walk, masks, dQ staging and epilogue as the mma.sync body in flash_bwd_kernel.h, with
// the five products issued as wgmma on shared-memory operands (bwd_gmma_traits.h says why).
//
// Per query block: S = Q K^T and dP = dO V^T are issued together; P is computed once S has landed
// while dP still runs. After the barrier that publishes P and dS, dQ = dS K, dV += P^T dO and
// dK += dS^T Q are issued together; dQ goes to the staging tile once it has landed, while dV and
// dK still run.
//
// wgmma reads shared memory through the async proxy: writes made by the threads (P, dS) or by
// cp.async (Q, dO, K, V) are fenced to it (fence.proxy.async) before the barrier that precedes
// the products reading them. A product's reads are complete once its wait returns, which every
// thread passes before the next barrier, so later writes to the same buffers need no fence.
#pragma once

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "bwd_block_steps.h"
#include "bwd_gmma_traits.h"
#include "bwd_utils.h"
#include "flash_params.h"

namespace ring_attn {
namespace bwd {

// Issues acc (+)= A B over the whole K extent of descriptor fragments tCrA, tCrB as one wgmma
// batch; kZeroInit: acc starts from zero instead of its contents. The caller waits for it
// (cute::warpgroup_wait) before it reads acc.
template <bool kZeroInit, typename TiledMma, typename FragA, typename FragB, typename Acc>
__device__ __forceinline__ void issue_gmma(TiledMma& mma, const FragA& tCrA, const FragB& tCrB, Acc& acc) {
    using namespace cute;
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    mma.accumulate_ = kZeroInit ? SM90::GMMA::ScaleOut::Zero : SM90::GMMA::ScaleOut::One;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tCrA); ++k) {
        gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
        mma.accumulate_ = SM90::GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
}

// Waits until at most kPending of this warpgroup's wgmma batches are still running, then orders the
// accumulator's later uses after it.
template <int kPending, typename Acc>
__device__ __forceinline__ void wait_gmma(Acc& acc) {
    cute::warpgroup_wait<kPending>();
    cute::warpgroup_fence_operand(acc);
}

// The same pointer, through an empty asm the compiler must assume changes it: values derived from
// it cannot be hoisted above this point.
template <typename T>
__device__ __forceinline__ T* opaque_pointer(T* pointer) {
    asm volatile("" : "+l"(pointer));
    return pointer;
}

// kKeysTail: the key block may end past seqlen_k (as compute_dq_dk_dv's; masked kernels pass true).
// dQ always leaves through the staging tile and the TMA.
template <typename Traits, bool kIsMasked, bool kKeysTail>
__device__ __forceinline__ void compute_dq_dk_dv_gmma(const BwdParams& params, const CUtensorMap& dq_map,
                                                      char* smem_raw, const CtaTile& tile, int dq_map_row0) {
    using namespace cute;
    using Gmma = BwdGmmaTraits<Traits>;
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kHeadDim = Traits::kHeadDim;
    using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
    using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
    using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
    static_assert(Traits::kStageDq && Traits::kStages == 2, "staged dQ, double-buffered Q and dO");

    const int tid = threadIdx.x;
    const KeyBlock block = locate_key_block<kBlockM, kBlockN, kIsMasked>(params, tile);
    if (block.m_block_first > block.m_block_last) return zero_unseen_key_block<Element, kHeadDim>(params, block);
    const float* lse = params.lse + tile.batch * params.lse_batch_stride + tile.head * params.lse_head_stride;
    const float* delta = params.delta + tile.batch * params.delta_batch_stride + tile.head * params.delta_head_stride;

    // Shared memory as in compute_dq_dk_dv: K, V, Q[2], dO[2], P, dS, then the fp32 dQ staging tile.
    Element* smem_k = reinterpret_cast<Element*>(smem_raw);
    Element* smem_v = smem_k + Traits::kSizeKV;
    Element* smem_q = smem_v + Traits::kSizeKV;
    Element* smem_do = smem_q + Traits::kSizeQ;
    Element* smem_p = smem_do + Traits::kSizeQ;
    Element* smem_ds = smem_p + Traits::kSizePdS;
    float* smem_dq = reinterpret_cast<float*>(smem_raw + Traits::kSmemOperandBytes);
    // The copies write through Traits' layouts, the products read through Gmma's: the same bytes.
    const auto copies =
        query_block_copies<Traits>(params, tile, make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{}),
                                   make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQ{}));
    Tensor sdQ = make_tensor(make_smem_ptr(smem_dq), typename Traits::SmemLayoutDq{});   // (kBlockM, kHeadDim)

    // The products' thread slices. Their operands are shared-memory descriptors (the same for every
    // thread of a warpgroup), built in each query block.
    typename Gmma::TiledMmaSdP mma_sdp;
    typename Gmma::TiledMmadKV mma_dkv;
    typename Gmma::TiledMmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_dkv = mma_dkv.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);

    // Where this thread's S/dP accumulator elements sit in the tile, and where P/dS go in smem.
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(TileS{}));
    Tensor tScS_rc = make_tensor(tScS.data(), accumulator_rows_cols(tScS.layout()));  // (rows, cols)
    // (Written through Traits' layout: the same bytes, addressed as shared memory with offsets the
    // compiler folds, where the pointer-swizzled form becomes generic stores with run-time swizzles.)
    Tensor tPsP = thr_sdp.partition_C(make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdS{}));
    Tensor tdSsdS = thr_sdp.partition_C(make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdS{}));
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;
    Tensor tdQsdQ = thr_dq.partition_C(sdQ);
    // The first row of the staged dQ tile that still waits for its reduction (-1: none).
    int staged_dq_row = -1;

    Tensor acc_dk = partition_fragment_C(mma_dkv, TileKV{});
    Tensor acc_dv = partition_fragment_C(mma_dkv, TileKV{});
    clear(acc_dk);
    clear(acc_dv);

    // Prologue: this CTA's K and V, then the first (last in order) query block.
    load_key_block<Traits>(params, tile, block,
                           make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{}),
                           make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{}));
    load_query_block<true, Traits>(copies, block.m_block_last, 0, params.seqlen_q - block.m_block_last * kBlockM);
    cp_async_fence();

    int stage = 0;
    auto process_query_block = [&](auto mask_step, int m_block) __attribute__((always_inline)) {
        const int query_begin = m_block * kBlockM;
        // The descriptors of every product's operands: about a hundred 64-bit values, which ptxas
        // would otherwise hoist out of the loop and spill. Addressed from a base the compiler cannot
        // see through, they are recomputed here, each a few integer operations next to its use.
        Element* base = opaque_pointer(smem_k);
        auto at = [&](const Element* buffer) { return make_smem_ptr(base + (buffer - smem_k)); };
        Tensor tSrQ = thr_sdp.partition_fragment_A(make_tensor(at(smem_q), typename Gmma::SmemLayoutQ{}));
        Tensor tSrK = thr_sdp.partition_fragment_B(make_tensor(at(smem_k), typename Gmma::SmemLayoutKV{}));
        Tensor tdPrdO = thr_sdp.partition_fragment_A(make_tensor(at(smem_do), typename Gmma::SmemLayoutQ{}));
        Tensor tdPrV = thr_sdp.partition_fragment_B(make_tensor(at(smem_v), typename Gmma::SmemLayoutKV{}));
        Tensor tdVrPt = thr_dkv.partition_fragment_A(make_tensor(at(smem_p), typename Gmma::SmemLayoutPdSt{}));
        Tensor tdVrdOt = thr_dkv.partition_fragment_B(make_tensor(at(smem_do), typename Gmma::SmemLayoutQt{}));
        Tensor tdKrdSt = thr_dkv.partition_fragment_A(make_tensor(at(smem_ds), typename Gmma::SmemLayoutPdSt{}));
        Tensor tdKrQt = thr_dkv.partition_fragment_B(make_tensor(at(smem_q), typename Gmma::SmemLayoutQt{}));
        Tensor tdQrdS = thr_dq.partition_fragment_A(make_tensor(at(smem_ds), typename Gmma::SmemLayoutPdS{}));
        Tensor tdQrKt = thr_dq.partition_fragment_B(make_tensor(at(smem_k), typename Gmma::SmemLayoutKt{}));

        float lse_log2[kRows];
        float scaled_delta[kRows];
        load_row_statistics(params, lse, delta, query_begin, tScS_rc, lse_log2, scaled_delta);

        cp_async_wait<0>();
        fence_shared_for_async_proxy();  // this thread's cp.async writes, for the wgmma reads
        __syncthreads();  // this block's Q/dO (and K/V) have landed; every warp is done with the last block
        reduce_staged_dq<Traits>(dq_map, smem_dq, staged_dq_row, dq_map_row0, tile.head, tile.batch);
        // The next query block loads into the other buffer during this whole block (every row of it
        // exists: see compute_dq_dk_dv).
        if (m_block > block.m_block_first) {
            load_query_block<false, Traits>(copies, m_block - 1, stage ^ 1, params.seqlen_q - (m_block - 1) * kBlockM);
        }
        cp_async_fence();

        // S = Q K^T and dP = dO V^T; P in place of S while dP runs.
        Tensor acc_s = partition_fragment_C(mma_sdp, TileS{});
        Tensor acc_dp = partition_fragment_C(mma_sdp, TileS{});
        issue_gmma<true>(mma_sdp, tSrQ(_, _, _, stage), tSrK, acc_s);
        issue_gmma<true>(mma_sdp, tdPrdO(_, _, _, stage), tdPrV, acc_dp);
        wait_gmma<1>(acc_s);
        Tensor p = make_tensor(acc_s.data(), accumulator_rows_cols(acc_s.layout()));  // (rows, cols)
        scores_to_probabilities<decltype(mask_step)::value, kIsMasked>(params, p, tScS_rc, lse_log2, query_begin,
                                                                        block);
        Tensor rP = convert_fragment<Element>(acc_s);
        copy(rP, tPsP);
        wait_gmma<0>(acc_dp);
        Tensor ds = make_tensor(acc_dp.data(), accumulator_rows_cols(acc_dp.layout()));
        probability_grads_to_score_grads(ds, make_tensor(rP.data(), accumulator_rows_cols(rP.layout())),
                                         params.softmax_scale, scaled_delta);
        Tensor rdS = convert_fragment<Element>(acc_dp);
        copy(rdS, tdSsdS);
        fence_shared_for_async_proxy();  // P and dS, for the wgmma reads
        // The last block's dQ reduction must have read the staging tile before it is rewritten below.
        if (tid == 0) wait_bulk_reads();
        __syncthreads();  // P and dS are visible to every warpgroup

        // dQ = dS K, dV += P^T dO, dK += dS^T Q; dQ to the staging tile while dV and dK run. Its
        // reductions are issued after the next barrier.
        Tensor acc_dq = partition_fragment_C(mma_dq, TileQ{});
        issue_gmma<true>(mma_dq, tdQrdS, tdQrKt, acc_dq);
        issue_gmma<false>(mma_dkv, tdVrPt, tdVrdOt(_, _, _, stage), acc_dv);
        issue_gmma<false>(mma_dkv, tdKrdSt, tdKrQt(_, _, _, stage), acc_dk);
        wait_gmma<2>(acc_dq);
        store_fragment_smem(acc_dq, tdQsdQ);
        fence_shared_for_async_proxy();
        staged_dq_row = query_begin;
        wait_gmma<0>(acc_dv);
        warpgroup_fence_operand(acc_dk);
        stage ^= 1;
    };
    walk_query_blocks<kBlockM, kBlockN, kIsMasked, kKeysTail>(params, block, process_query_block);

    __syncthreads();  // the last block's staged dQ is complete
    reduce_staged_dq<Traits>(dq_map, smem_dq, staged_dq_row, dq_map_row0, tile.head, tile.batch);
    if (tid == 0) wait_bulk_done();

    write_dk_dv<Traits>(params, block, thr_dkv, acc_dk, acc_dv, smem_q);
}

}  // namespace bwd
}  // namespace ring_attn
