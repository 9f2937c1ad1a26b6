// FlashAttention-2-style backward ("seqk-parallel"): one CTA per (key block, batch, query head),
// started in the order bwd_cta_order.h chooses; in a varlen launch, one per (key block, packed
// sequence, query head) (packed_sequences.h).
// The CTA keeps its K and V tile in shared memory and walks the query blocks that the mask band lets
// see any of its keys, from the last to the first (banded kernels: in three loops, so that blocks
// which need per-element masking run apart from those that do not). For each query block it
// recomputes the probabilities from the saved log-sum-exp, accumulates dK and dV in registers, and
// adds its share of dQ into the caller's fp32 dq_accum: with fp32 atomics, or (Traits::kStageDq,
// Hopper) through a shared-memory tile and TMA bulk reductions. At the end it adds dK and dV into the
// caller's fp32 dk_accum / dv_accum (plain read-add-write when it owns the tile, atomics under GQA),
// or, without GQA, writes them: in fp32 over dk_accum / dv_accum (dkv_overwrite, a ring step's first
// call on those key rows) or, for a plain backward, in the input dtype to dk_out / dv_out.
// This file's body multiplies with mma.sync (every head dim on Ampere; d 32, 96 and 256 on Hopper);
// flash_bwd_gmma.h's, with the same steps (bwd_block_steps.h), with wgmma (d 64 and 128 on Hopper).
//
// Math, with S the unscaled scores and scale = softmax_scale:
//   P  = exp(scale * S - lse) = exp2(S * scale * log2(e) - lse * log2(e))
//   dP = dO V^T;   dS = scale * P o (dP - delta), delta = rowsum(dO o O)
//   dV = P^T dO;   dK = dS^T Q;   dQ = dS K
// (dS carries the softmax scale, which both dK and dQ need: one FMA per dS element instead of a
// multiply per dQ element every block and per dK element at the end.)
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

#include "bwd_block_steps.h"
#include "bwd_cta_order.h"
#include "bwd_traits.h"
#include "bwd_utils.h"
#include "dq_tensor_map.h"
#include "flash_bwd_gmma.h"
#include "flash_params.h"
#include "packed_sequences.h"

namespace ring_attn {
namespace bwd {

// A register-fragment-sized tensor of a given shape: partition_fragment_* needs only the shape.
template <typename Element, typename Shape>
__device__ __forceinline__ auto shape_only(const Shape& shape) {
    return cute::make_tensor(cute::make_smem_ptr(static_cast<Element*>(nullptr)), cute::make_layout(shape));
}

// kKeysTail: the key block may end past seqlen_k, so P needs its columns masked (kIsMasked kernels
// pass true and test the block's width themselves: a key tail masks every block of their walk).
// kStageDq: dQ leaves through the staging tile and the TMA (needs Traits::kStageDq, which sizes
// shared memory for it); otherwise through atomics.
// dq_map_row0: the descriptor row of this CTA's query row 0 (reduce_staged_dq).
template <typename Traits, bool kIsMasked, bool kKeysTail, bool kStageDq>
__device__ __forceinline__ void compute_dq_dk_dv(const BwdParams& params, const CUtensorMap& dq_map, char* smem_raw,
                                                 const CtaTile& tile, int dq_map_row0) {
    using namespace cute;
    using Element = typename Traits::Element;
    constexpr int kBlockM = Traits::kBlockM;
    constexpr int kBlockN = Traits::kBlockN;
    constexpr int kHeadDim = Traits::kHeadDim;
    constexpr int kStages = Traits::kStages;
    using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
    using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
    using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
    static_assert(!kStageDq || Traits::kStageDq, "staging dQ needs the traits' shared-memory tile");

    // (This setup's locals and their order are the ones under which ptxas allocated the hot loop
    // best: other arrangements of the same code cost up to 25 instructions per query block at d 96,
    // by scripts/sass_loop_stats.py.)
    const int tid = threadIdx.x;
    const int batch = tile.batch;
    const int head = tile.head;
    const KeyBlock block = locate_key_block<kBlockM, kBlockN, kIsMasked>(params, tile);
    if (block.m_block_first > block.m_block_last) return zero_unseen_key_block<Element, kHeadDim>(params, block);
    const int m_block_first = block.m_block_first;
    const int m_block_last = block.m_block_last;

    // Global memory. Row strides are runtime values, the head dim is contiguous.
    Tensor mQ = head_rows<Traits>(params.q, batch * params.q_batch_stride + head * params.q_head_stride,
                                  params.seqlen_q, params.q_row_stride);
    Tensor mdO = head_rows<Traits>(params.dout, batch * params.do_batch_stride + head * params.do_head_stride,
                                   params.seqlen_q, params.do_row_stride);
    Tensor gQ = local_tile(mQ, TileQ{}, make_coord(_, _0{}));    // (kBlockM, kHeadDim, m_blocks)
    Tensor gdO = local_tile(mdO, TileQ{}, make_coord(_, _0{}));  // (kBlockM, kHeadDim, m_blocks)
    const float* lse = params.lse + batch * params.lse_batch_stride + head * params.lse_head_stride;
    const float* delta = params.delta + batch * params.delta_batch_stride + head * params.delta_head_stride;
    float* dq_accum = params.dq_accum + batch * params.dq_batch_stride + head * params.dq_head_stride;

    // Shared memory: K, V, Q[kStages], dO[kStages], P, dS; plus transposed views of the same bytes.
    Element* smem = reinterpret_cast<Element*>(smem_raw);
    Tensor sK = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem + Traits::kSizeKV), typename Traits::SmemLayoutKV{});
    Element* smem_q = smem + 2 * Traits::kSizeKV;
    Element* smem_do = smem_q + Traits::kSizeQ;
    Element* smem_p = smem_do + Traits::kSizeQ;
    Element* smem_ds = smem_p + Traits::kSizePdS;
    Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});    // (kBlockM, kHeadDim, kStages)
    Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQ{});  // (kBlockM, kHeadDim, kStages)
    Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdS{});   // (kBlockM, kBlockN)
    Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdS{});  // (kBlockM, kBlockN)
    Tensor sKt = make_tensor(make_smem_ptr(smem), typename Traits::SmemLayoutKt{});      // (kHeadDim, kBlockN)
    Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQt{});    // (kHeadDim, kBlockM, kStages)
    Tensor sdOt = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQt{});  // (kHeadDim, kBlockM, kStages)
    Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdSt{});  // (kBlockN, kBlockM)
    Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdSt{});  // (kBlockN, kBlockM)
    // The dQ staging tile (kStageDq only), after the 16-bit operands.
    float* smem_dq = reinterpret_cast<float*>(smem_raw + Traits::kSmemOperandBytes);
    Tensor sdQ = make_tensor(make_smem_ptr(smem_dq), typename Traits::SmemLayoutDq{});  // (kBlockM, kHeadDim)

    // Global -> shared copies of the query blocks, with the row coordinate of each copied chunk for the
    // tail predicate. (Written out rather than through query_block_copies, as the wgmma body does: that
    // helper changed ptxas's register allocation of this body, 252 instead of 255 registers at d 96.)
    typename Traits::GmemTiledCopy gmem_copy;
    auto gmem_thr = gmem_copy.get_thread_slice(tid);
    Tensor tQgQ = gmem_thr.partition_S(gQ);     // (CPY, CPY_M, CPY_K, m_blocks)
    Tensor tQsQ = gmem_thr.partition_D(sQ);     // (CPY, CPY_M, CPY_K, kStages)
    Tensor tdOgdO = gmem_thr.partition_S(gdO);
    Tensor tdOsdO = gmem_thr.partition_D(sdO);
    Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(TileQ{}));

    // The five products: their thread slices, register fragments and ldmatrix partitions.
    typename Traits::TiledMmaSdP mma_sdp;
    typename Traits::TiledMmadKV mma_dkv;
    typename Traits::TiledMmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tid);
    auto thr_dkv = mma_dkv.get_thread_slice(tid);
    auto thr_dq = mma_dq.get_thread_slice(tid);

    Tensor tSrQ = thr_sdp.partition_fragment_A(shape_only<Element>(TileQ{}));
    Tensor tSrK = thr_sdp.partition_fragment_B(shape_only<Element>(TileKV{}));
    Tensor tdPrdO = thr_sdp.partition_fragment_A(shape_only<Element>(TileQ{}));
    Tensor tdPrV = thr_sdp.partition_fragment_B(shape_only<Element>(TileKV{}));
    // dV and dK share operand shapes: A is (kBlockN, kBlockM), B is (kHeadDim, kBlockM).
    Tensor tdKVrA = thr_dkv.partition_fragment_A(shape_only<Element>(Shape<Int<kBlockN>, Int<kBlockM>>{}));
    Tensor tdKVrB = thr_dkv.partition_fragment_B(shape_only<Element>(Shape<Int<kHeadDim>, Int<kBlockM>>{}));
    Tensor tdQrdS = thr_dq.partition_fragment_A(shape_only<Element>(TileS{}));
    Tensor tdQrKt = thr_dq.partition_fragment_B(shape_only<Element>(Shape<Int<kHeadDim>, Int<kBlockN>>{}));

    auto copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
    auto copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
    auto copy_a_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTrans{}, mma_dkv);
    auto copy_b_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTrans{}, mma_dkv);
    auto copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
    auto copy_b_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTrans{}, mma_dq);
    Tensor tSsQ = copy_a_sdp.get_thread_slice(tid).partition_S(sQ);      // (CPY, CPY_M, CPY_K, kStages)
    Tensor tSsK = copy_b_sdp.get_thread_slice(tid).partition_S(sK);
    Tensor tdPsdO = copy_a_sdp.get_thread_slice(tid).partition_S(sdO);   // (CPY, CPY_M, CPY_K, kStages)
    Tensor tdPsV = copy_b_sdp.get_thread_slice(tid).partition_S(sV);
    Tensor tdVsPt = copy_a_dkv.get_thread_slice(tid).partition_S(sPt);
    Tensor tdVsdOt = copy_b_dkv.get_thread_slice(tid).partition_S(sdOt);  // (CPY, CPY_N, CPY_K, kStages)
    Tensor tdKsdSt = copy_a_dkv.get_thread_slice(tid).partition_S(sdSt);
    Tensor tdKsQt = copy_b_dkv.get_thread_slice(tid).partition_S(sQt);    // (CPY, CPY_N, CPY_K, kStages)
    Tensor tdQsdS = copy_a_dq.get_thread_slice(tid).partition_S(sdS);
    Tensor tdQsKt = copy_b_dq.get_thread_slice(tid).partition_S(sKt);

    // Where this thread's S/dP accumulator elements sit in the tile, and where P/dS go in smem.
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(TileS{}));
    Tensor tScS_rc = make_tensor(tScS.data(), accumulator_rows_cols(tScS.layout()));  // (rows, cols)
    Tensor tPsP = thr_sdp.partition_C(sP);
    Tensor tdSsdS = thr_sdp.partition_C(sdS);
    constexpr int kRows = decltype(size<0>(tScS_rc))::value;

    // dQ: this thread's elements, their tile coordinates.
    Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(TileQ{}));
    Tensor tdQsdQ = thr_dq.partition_C(sdQ);
    // The first row of the staged dQ tile that still waits for its reduction (-1: none). The
    // reduction is issued after the next barrier, so one barrier per query block serves both.
    int staged_dq_row = -1;
    const bool dq_pairs_aligned = pairs_aligned(params.dq_accum, params.dq_batch_stride, params.dq_row_stride,
                                                params.dq_head_stride);

    Tensor acc_dk = partition_fragment_C(mma_dkv, TileKV{});
    Tensor acc_dv = partition_fragment_C(mma_dkv, TileKV{});
    clear(acc_dk);
    clear(acc_dv);

    // Prologue: this CTA's K and V, then the first (last in order) query block.
    load_key_block<Traits>(params, tile, block, sK, sV);
    const int first_rows = params.seqlen_q - m_block_last * kBlockM;
    load_rows(gmem_copy, tQgQ(_, _, _, m_block_last), tQsQ(_, _, _, 0), tQcQ, first_rows);
    load_rows(gmem_copy, tdOgdO(_, _, _, m_block_last), tdOsdO(_, _, _, 0), tQcQ, first_rows);
    cute::cp_async_fence();

    // V in registers (Traits::kVInRegs): once K/V and the first query block have landed.
    if constexpr (Traits::kVInRegs) {
        cute::cp_async_wait<0>();
        __syncthreads();
        copy(copy_b_sdp, tdPsV, make_tensor(tdPrV.data(), decltype(copy_b_sdp)::retile(tdPrV.layout())));
    }

    int stage = 0;

    // One query block: dV, dK and this block's dQ share. mask_step (a std::bool_constant): whether
    // P needs per-element masking (key tail, band edges); the loops below know it per block.
    // always_inline: out of line, the register fragments it captures would live in local memory.
    auto process_query_block = [&](auto mask_step, int m_block) __attribute__((always_inline)) {
        const int query_begin = m_block * kBlockM;
        const int rows_in_block = min(kBlockM, params.seqlen_q - query_begin);

        float lse_log2[kRows];
        float scaled_delta[kRows];
        load_row_statistics(params, lse, delta, query_begin, tScS_rc, lse_log2, scaled_delta);

        cute::cp_async_wait<0>();
        __syncthreads();  // this block's Q/dO (and K/V) have landed; every warp is done with the last block
        if constexpr (kStageDq) reduce_staged_dq<Traits>(dq_map, smem_dq, staged_dq_row, dq_map_row0, head, batch);

        // The next query block loads into the other buffer (free since the barrier above: the last
        // block's products have all read it) during this whole block. Only the first block of the
        // walk can end past seqlen_q, so every row exists here and nothing needs zero-filling; the
        // row tests stay (without them ptxas keeps the addresses live across the loop and spills
        // inside it, seen at d128).
        if constexpr (kStages == 2) {
            if (m_block > m_block_first) {
                const int next_rows = params.seqlen_q - (m_block - 1) * kBlockM;
                load_rows<false>(gmem_copy, tQgQ(_, _, _, m_block - 1), tQsQ(_, _, _, stage ^ 1), tQcQ, next_rows);
                load_rows<false>(gmem_copy, tdOgdO(_, _, _, m_block - 1), tdOsdO(_, _, _, stage ^ 1), tQcQ, next_rows);
            }
            cute::cp_async_fence();
        }

        // S = Q K^T, then P in place of S.
        Tensor acc_s = partition_fragment_C(mma_sdp, TileS{});
        clear(acc_s);
        gemm_smem(mma_sdp, acc_s, tSrQ, tSrK, tSsQ(_, _, _, stage), tSsK, copy_a_sdp, copy_b_sdp);
        Tensor p = make_tensor(acc_s.data(), accumulator_rows_cols(acc_s.layout()));  // (rows, cols)
        scores_to_probabilities<decltype(mask_step)::value, kIsMasked>(params, p, tScS_rc, lse_log2, query_begin,
                                                                        block);
        // From here on P lives only as 16-bit values (registers and smem): half the registers of the
        // fp32 accumulator, which the dP product below needs. dS uses the same rounded P as dV.
        Tensor rP = convert_fragment<Element>(acc_s);
        copy(rP, tPsP);

        // dP = dO V^T, then dS = scale * P o (dP - delta) in place of dP.
        Tensor acc_dp = partition_fragment_C(mma_sdp, TileS{});
        clear(acc_dp);
        if constexpr (Traits::kVInRegs) {
            gemm_smem_a(mma_sdp, acc_dp, tdPrdO, tdPrV, tdPsdO(_, _, _, stage), copy_a_sdp);
        } else {
            gemm_smem(mma_sdp, acc_dp, tdPrdO, tdPrV, tdPsdO(_, _, _, stage), tdPsV, copy_a_sdp, copy_b_sdp);
        }
        Tensor ds = make_tensor(acc_dp.data(), accumulator_rows_cols(acc_dp.layout()));
        probability_grads_to_score_grads(ds, make_tensor(rP.data(), accumulator_rows_cols(rP.layout())),
                                         params.softmax_scale, scaled_delta);
        Tensor rdS = convert_fragment<Element>(acc_dp);
        copy(rdS, tdSsdS);
        // The last block's dQ reduction must have read the staging tile before it is rewritten below.
        if constexpr (kStageDq) {
            if (tid == 0) wait_bulk_reads();
        }
        __syncthreads();  // P and dS are visible to every warp

        // dV += P^T dO and dK += dS^T Q accumulate in registers.
        gemm_smem(mma_dkv, acc_dv, tdKVrA, tdKVrB, tdVsPt, tdVsdOt(_, _, _, stage), copy_a_dkv, copy_b_dkv);
        gemm_smem(mma_dkv, acc_dk, tdKVrA, tdKVrB, tdKsdSt, tdKsQt(_, _, _, stage), copy_a_dkv, copy_b_dkv);

        // dQ += dS K, added into the caller's fp32 accumulator: staged for the TMA (reduced after the
        // next barrier) or from registers with atomics.
        // Last, so the reductions drain while the next block's first product runs. (An earlier H100
        // measurement, d64/d128: this order with the next block's load issued right after the first
        // barrier was about 4% faster than loading after P and computing dQ between dV and dK.)
        Tensor acc_dq = partition_fragment_C(mma_dq, TileQ{});
        clear(acc_dq);
        gemm_smem(mma_dq, acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, copy_a_dq, copy_b_dq);
        if constexpr (kStageDq) {
            store_fragment_smem(acc_dq, tdQsdQ);
            fence_shared_for_async_proxy();
            staged_dq_row = query_begin;
        } else {
            Tensor gdQ = make_tensor(make_gmem_ptr(dq_accum + int64_t(query_begin) * params.dq_row_stride),
                                     TileQ{}, make_stride(params.dq_row_stride, _1{}));
            add_fragment<FragmentOp::kAtomicAdd, kBlockM>(acc_dq, thr_dq.partition_C(gdQ), tdQcdQ, rows_in_block,
                                                          dq_pairs_aligned);
        }

        if constexpr (kStages == 1) {
            if (m_block > m_block_first) {
                __syncthreads();  // every warp is done reading this block's Q and dO
                const int next_rows = params.seqlen_q - (m_block - 1) * kBlockM;
                load_rows(gmem_copy, tQgQ(_, _, _, m_block - 1), tQsQ(_, _, _, 0), tQcQ, next_rows);
                load_rows(gmem_copy, tdOgdO(_, _, _, m_block - 1), tdOsdO(_, _, _, 0), tQcQ, next_rows);
                cute::cp_async_fence();
            }
        } else {
            stage ^= 1;
        }
    };

    walk_query_blocks<kBlockM, kBlockN, kIsMasked, kKeysTail>(params, block, process_query_block);

    if constexpr (kStageDq) {
        __syncthreads();  // the last block's staged dQ is complete
        reduce_staged_dq<Traits>(dq_map, smem_dq, staged_dq_row, dq_map_row0, head, batch);
        if (tid == 0) wait_bulk_done();
    }

    write_dk_dv<Traits>(params, block, thr_dkv, acc_dk, acc_dv, smem_q);
}

// Kernels without a band run CTAs whose key block lies wholly inside seqlen_k (all but at most the
// last per (batch, head)) through a copy of the loop with no masking code. With the key-tail test in
// the loop, ptxas turns that masking into predicated selects which every block executes (about 80
// instructions per block at d128, 150 at d64, in the SASS). Banded kernels keep one copy: their
// masking is a real branch, taken only by tiles that cross an edge of the band.
// The key-tail copy adds dQ with atomics even where the traits stage it. It runs for one CTA in
// seqlen_k / kBlockN, so this costs little, and its staged d64 build was wrong (with the earlier
// 32-column swizzled staging tile; not retried since): on H100 that CTA
// got wrong dQ, dK and dV, and compute-sanitizer's racecheck showed one lane's ldmatrix of dS
// reading past the dS tile into the staging tile. The cause was not found in the source (the
// interior copy and the d128 build, staged the same way, are correct and race-free).
// On Hopper, configs that kBwdUsesGmma admits (d 64 and 128) run every CTA through the wgmma body
// (flash_bwd_gmma.h) instead, split the same way.
template <typename Traits, bool kIsMasked>
__device__ __forceinline__ void compute_key_block(const BwdParams& params, const CUtensorMap& dq_map, char* smem_raw,
                                                  const CtaTile& tile, int dq_map_row0) {
    const bool interior = (tile.n_block + 1) * Traits::kBlockN <= params.seqlen_k;
    if constexpr (kBwdUsesGmma<Traits> && kIsMasked) {
        compute_dq_dk_dv_gmma<Traits, true, true>(params, dq_map, smem_raw, tile, dq_map_row0);
    } else if constexpr (kBwdUsesGmma<Traits>) {
        if (interior) {
            compute_dq_dk_dv_gmma<Traits, false, false>(params, dq_map, smem_raw, tile, dq_map_row0);
        } else {
            compute_dq_dk_dv_gmma<Traits, false, true>(params, dq_map, smem_raw, tile, dq_map_row0);
        }
    } else if constexpr (kIsMasked) {
        compute_dq_dk_dv<Traits, true, true, Traits::kStageDq>(params, dq_map, smem_raw, tile, dq_map_row0);
    } else if (interior) {
        compute_dq_dk_dv<Traits, false, false, Traits::kStageDq>(params, dq_map, smem_raw, tile, dq_map_row0);
    } else {
        compute_dq_dk_dv<Traits, false, true, false>(params, dq_map, smem_raw, tile, dq_map_row0);
    }
}

// One CTA of a varlen launch (BwdParams::sequences): key block blockIdx.x of table entry blockIdx.y,
// query head blockIdx.z, on the entry's rows as a batch of one. The grid is sized by the longest key
// run, so CTAs past their entry's keys return at once.
template <typename Traits, bool kIsMasked>
__device__ __forceinline__ void compute_packed_key_block(const BwdParams& params, const CUtensorMap& dq_map,
                                                         char* smem_raw) {
    const PackedSequence sequence = load_packed_sequence(params.sequences, blockIdx.y);
    const BwdParams one = sequence_params<typename Traits::Element>(params, sequence);
    if (int(blockIdx.x) * Traits::kBlockN >= one.seqlen_k) return;
    compute_key_block<Traits, kIsMasked>(one, dq_map, smem_raw, CtaTile{int(blockIdx.x), 0, int(blockIdx.z)},
                                         sequence.q_begin);
}

}  // namespace bwd

// The Hopper build (sm_90a) and the Ampere build (sm_80) may use different traits (e.g. fewer
// shared-memory stages where the SM has less shared memory); the launcher sizes shared memory for
// the one the running device executes. kOrder: how the grid maps to tiles (bwd_cta_order.h).
template <typename TraitsSm90, typename TraitsSm80, bool kIsMasked, bwd::CtaOrder kOrder>
__global__ void __launch_bounds__(TraitsSm90::kThreads, 1) flash_bwd_kernel(const __grid_constant__ BwdParams params,
                                                                       const __grid_constant__ CUtensorMap dq_map) {
    static_assert(TraitsSm90::kThreads == TraitsSm80::kThreads && TraitsSm90::kBlockN == TraitsSm80::kBlockN);
    extern __shared__ __align__(1024) char smem[];  // 128: TMA boxes; 1024: the wgmma swizzle (bwd_gmma_traits.h)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    bwd::compute_key_block<TraitsSm90, kIsMasked>(params, dq_map, smem, bwd::cta_tile<kOrder>(), 0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    bwd::compute_key_block<TraitsSm80, kIsMasked>(params, dq_map, smem, bwd::cta_tile<kOrder>(), 0);
#endif
}

// The varlen backward (BwdParams::sequences), in the plain order: grid (key blocks of the longest
// key run, table entries, heads). dq_map spans every packed row, as a batch of one.
template <typename TraitsSm90, typename TraitsSm80, bool kIsMasked>
__global__ void __launch_bounds__(TraitsSm90::kThreads, 1)
    flash_bwd_packed_kernel(const __grid_constant__ BwdParams params, const __grid_constant__ CUtensorMap dq_map) {
    extern __shared__ __align__(1024) char smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    bwd::compute_packed_key_block<TraitsSm90, kIsMasked>(params, dq_map, smem);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    bwd::compute_packed_key_block<TraitsSm80, kIsMasked>(params, dq_map, smem);
#endif
}

}  // namespace ring_attn
