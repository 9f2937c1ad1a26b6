// The steps of a backward CTA that do not depend on how it multiplies matrices, shared by the
// mma.sync body (flash_bwd_kernel.h) and the Hopper wgmma body (flash_bwd_gmma.h): where its key
// block sits, the global -> shared copies, the walk over query blocks, each query block's row
// statistics and mask, the staged dQ reductions and the dK/dV epilogue.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

#include "bwd_cta_order.h"
#include "bwd_utils.h"
#include "dq_tensor_map.h"
#include "flash_params.h"
#include "mask.h"

namespace ring_attn {
namespace bwd {

// Copies a tile's rows from global to shared memory with cp.async; rows at or past `rows` are
// zero-filled instead (they would otherwise hold stale data that turns 0 * x into NaN), or, without
// kZeroFill, left alone: for loads whose rows the caller knows all exist, where the fill would only
// cost issued (predicated-off) stores, four per 16-byte chunk.
template <bool kZeroFill = true, typename TiledCopy, typename Src, typename Dst, typename Coord>
__device__ __forceinline__ void load_rows(const TiledCopy& tiled_copy, const Src& src, Dst&& dst, const Coord& coord,
                                          int rows) {
    using namespace cute;
    CUTE_UNROLL
    for (int m = 0; m < size<1>(src); ++m) {
        if (get<0>(coord(0, m, 0)) < rows) {
            copy(tiled_copy, src(_, m, _), dst(_, m, _));
        } else if constexpr (kZeroFill) {
            clear(dst(_, m, _));
        }
    }
}

// Zeroes `rows` rows of kHeadDim elements (16-byte aligned, row_stride apart) starting `offset`
// elements into `base`, 16 bytes per thread and store.
template <typename Element, int kHeadDim>
__device__ __forceinline__ void zero_rows(void* base, int64_t offset, int64_t row_stride, int rows) {
    constexpr int kChunksPerRow = kHeadDim * int(sizeof(Element)) / 16;
    Element* start = static_cast<Element*>(base) + offset;
    for (int chunk = threadIdx.x; chunk < rows * kChunksPerRow; chunk += blockDim.x) {
        const int row = chunk / kChunksPerRow, col = chunk % kChunksPerRow;
        reinterpret_cast<uint4*>(start + row * row_stride)[col] = make_uint4(0, 0, 0, 0);
    }
}

// Zeroes `rows` fp32 rows of kHeadDim elements, row_stride apart, from `start`: one float per store,
// since an accumulator view need not be 16-byte aligned (this runs only for key blocks that no
// query sees).
template <int kHeadDim>
__device__ __forceinline__ void zero_rows_fp32(float* start, int64_t row_stride, int rows) {
    for (int i = threadIdx.x; i < rows * kHeadDim; i += blockDim.x) {
        start[(i / kHeadDim) * row_stride + i % kHeadDim] = 0.0f;
    }
}

// A CTA's key block: its keys, its kv head, where its dK/dV rows start in their destination
// (accumulators or outputs), and the query blocks whose rows see any of its keys.
struct KeyBlock {
    int key_begin, keys_in_block, head_kv;
    int64_t dk_offset, dv_offset;
    int m_block_first, m_block_last;  // m_block_first > m_block_last: no query sees these keys
};

template <int kBlockM, int kBlockN, bool kIsMasked>
__device__ __forceinline__ KeyBlock locate_key_block(const BwdParams& params, const CtaTile& tile) {
    KeyBlock block;
    block.key_begin = tile.n_block * kBlockN;
    block.keys_in_block = min(kBlockN, params.seqlen_k - block.key_begin);
    block.head_kv = tile.head / (params.heads / params.heads_kv);
    block.dk_offset = tile.batch * params.dk_batch_stride + block.head_kv * params.dk_head_stride +
                      int64_t(block.key_begin) * params.dk_row_stride;
    block.dv_offset = tile.batch * params.dv_batch_stride + block.head_kv * params.dv_head_stride +
                      int64_t(block.key_begin) * params.dv_row_stride;
    const QueryRange queries =
        visible_queries<kIsMasked>(params, block.key_begin, block.key_begin + block.keys_in_block);
    block.m_block_first = queries.begin / kBlockM;
    block.m_block_last = queries.begin < queries.end ? (queries.end - 1) / kBlockM : block.m_block_first - 1;
    return block;
}

// A key block no query sees adds nothing, but written outputs must hold zeros.
template <typename Element, int kHeadDim>
__device__ __forceinline__ void zero_unseen_key_block(const BwdParams& params, const KeyBlock& block) {
    if (params.dk_out != nullptr) {
        zero_rows<Element, kHeadDim>(params.dk_out, block.dk_offset, params.dk_row_stride, block.keys_in_block);
        zero_rows<Element, kHeadDim>(params.dv_out, block.dv_offset, params.dv_row_stride, block.keys_in_block);
    } else if (params.dkv_overwrite) {
        zero_rows_fp32<kHeadDim>(params.dk_accum + block.dk_offset, params.dk_row_stride, block.keys_in_block);
        zero_rows_fp32<kHeadDim>(params.dv_accum + block.dv_offset, params.dv_row_stride, block.keys_in_block);
    }
}

// The (rows, head dim) view of one head of a (batch, rows, heads, head dim) tensor.
template <typename Traits>
__device__ __forceinline__ auto head_rows(const void* base, int64_t offset, int rows, int64_t row_stride) {
    using namespace cute;
    return make_tensor(make_gmem_ptr(static_cast<const typename Traits::Element*>(base) + offset),
                       make_shape(rows, Int<Traits::kHeadDim>{}), make_stride(row_stride, _1{}));
}

// Copies K and V of the CTA's key block into sK and sV (Traits' SmemLayoutKV), rows past
// keys_in_block zero-filled.
template <typename Traits, typename Smem>
__device__ __forceinline__ void load_key_block(const BwdParams& params, const CtaTile& tile, const KeyBlock& block,
                                               Smem&& sK, Smem&& sV) {
    using namespace cute;
    using TileKV = Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>;
    typename Traits::GmemTiledCopy gmem_copy;
    auto thr = gmem_copy.get_thread_slice(threadIdx.x);
    Tensor mK = head_rows<Traits>(params.k, tile.batch * params.k_batch_stride + block.head_kv * params.k_head_stride,
                                  params.seqlen_k, params.k_row_stride);
    Tensor mV = head_rows<Traits>(params.v, tile.batch * params.v_batch_stride + block.head_kv * params.v_head_stride,
                                  params.seqlen_k, params.v_row_stride);
    Tensor tKcK = thr.partition_S(make_identity_tensor(TileKV{}));
    load_rows(gmem_copy, thr.partition_S(local_tile(mK, TileKV{}, make_coord(tile.n_block, _0{}))),
              thr.partition_D(sK), tKcK, block.keys_in_block);
    load_rows(gmem_copy, thr.partition_S(local_tile(mV, TileKV{}, make_coord(tile.n_block, _0{}))),
              thr.partition_D(sV), tKcK, block.keys_in_block);
}

// This thread's share of the Q and dO copies of every query block, into the stages of sQ and sdO
// (Traits' SmemLayoutQ): (Q source, Q destination, dO source, dO destination, row coordinates),
// the sources indexed (CPY, CPY_M, CPY_K, m_block) and the destinations (CPY, CPY_M, CPY_K, stage).
template <typename Traits, typename Smem>
__device__ __forceinline__ auto query_block_copies(const BwdParams& params, const CtaTile& tile, const Smem& sQ,
                                                   const Smem& sdO) {
    using namespace cute;
    using TileQ = Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>;
    typename Traits::GmemTiledCopy gmem_copy;
    auto thr = gmem_copy.get_thread_slice(threadIdx.x);
    Tensor mQ = head_rows<Traits>(params.q, tile.batch * params.q_batch_stride + tile.head * params.q_head_stride,
                                  params.seqlen_q, params.q_row_stride);
    Tensor mdO = head_rows<Traits>(params.dout, tile.batch * params.do_batch_stride + tile.head * params.do_head_stride,
                                   params.seqlen_q, params.do_row_stride);
    return make_tuple(thr.partition_S(local_tile(mQ, TileQ{}, make_coord(_, _0{}))), thr.partition_D(sQ),
                      thr.partition_S(local_tile(mdO, TileQ{}, make_coord(_, _0{}))), thr.partition_D(sdO),
                      thr.partition_S(make_identity_tensor(TileQ{})));
}

// Copies query block m_block's Q and dO rows (below `rows`) into stage `stage` (see load_rows for
// kZeroFill).
template <bool kZeroFill, typename Traits, typename Copies>
__device__ __forceinline__ void load_query_block(const Copies& copies, int m_block, int stage, int rows) {
    using namespace cute;
    typename Traits::GmemTiledCopy gmem_copy;
    load_rows<kZeroFill>(gmem_copy, get<0>(copies)(_, _, _, m_block), get<1>(copies)(_, _, _, stage), get<4>(copies),
                         rows);
    load_rows<kZeroFill>(gmem_copy, get<2>(copies)(_, _, _, m_block), get<3>(copies)(_, _, _, stage), get<4>(copies),
                         rows);
}

// Calls process(mask_step, m_block) for the CTA's query blocks from the last to the first.
// mask_step (a std::bool_constant) says whether P needs per-element masking there (key tail, band
// edges). Without a band, a key tail (kKeysTail) masks every block and an interior key block none.
// With one, the blocks that need masking sit at the two ends of the walk (the band's lower edge,
// i.e. a window, cuts high query blocks; its upper edge, i.e. a causal diagonal, low ones; a key
// tail cuts all), so it runs in three loops as the forward does: the hot middle one carries neither
// mask code nor a branch around it.
template <int kBlockM, int kBlockN, bool kIsMasked, bool kKeysTail, typename Process>
__device__ __forceinline__ void walk_query_blocks(const BwdParams& params, const KeyBlock& block, Process&& process) {
    int m_block = block.m_block_last;
    if constexpr (!kIsMasked) {
        CUTE_NO_UNROLL
        for (; m_block >= block.m_block_first; --m_block) process(cute::bool_constant<kKeysTail>{}, m_block);
    } else {
        const flash::BlockRange unmasked =
            block.keys_in_block < kBlockN
                ? flash::BlockRange{block.m_block_first, block.m_block_first}
                : flash::unmasked_query_blocks<kBlockM, kBlockN>(block.key_begin, params.mask,
                                                                 {block.m_block_first, block.m_block_last + 1});
        CUTE_NO_UNROLL
        for (; m_block >= unmasked.end; --m_block) process(cute::true_type{}, m_block);
        CUTE_NO_UNROLL
        for (; m_block >= unmasked.begin; --m_block) process(cute::false_type{}, m_block);
        CUTE_NO_UNROLL
        for (; m_block >= block.m_block_first; --m_block) process(cute::true_type{}, m_block);
    }
}

// This thread's rows of a query block (coords: the S tile's identity partition as (rows, cols)):
// lse as a base-2 exponent offset and scale * delta. Rows past seqlen_q and rows with lse = -inf
// (they see no key at all) get +inf, which makes their P exactly 0.
template <int kRows, typename Coords>
__device__ __forceinline__ void load_row_statistics(const BwdParams& params, const float* lse, const float* delta,
                                                    int query_begin, const Coords& coords, float (&lse_log2)[kRows],
                                                    float (&scaled_delta)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
        const int row = query_begin + cute::get<0>(coords(r, 0));
        const bool valid = row < params.seqlen_q;
        const float l = valid ? lse[row] : -INFINITY;
        lse_log2[r] = l == -INFINITY ? INFINITY : l * float(M_LOG2E);
        scaled_delta[r] = valid ? delta[row] * params.softmax_scale : 0.f;
    }
}

// P = exp2(S * scale * log2(e) - lse * log2(e)) in place of S (both viewed as (rows, cols));
// with kMask, entries whose key lies past the block's keys or outside the band become 0.
template <bool kMask, bool kIsMasked, int kRows, typename Scores, typename Coords>
__device__ __forceinline__ void scores_to_probabilities(const BwdParams& params, Scores& p, const Coords& coords,
                                                        const float (&lse_log2)[kRows], int query_begin,
                                                        const KeyBlock& block) {
    using namespace cute;
    const float scale_log2 = params.softmax_scale_log2;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(p); ++c) p(r, c) = exp2f(p(r, c) * scale_log2 - lse_log2[r]);
    }
    if constexpr (kMask) {
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            const int row = query_begin + get<0>(coords(r, 0));
            CUTE_UNROLL
            for (int c = 0; c < size<1>(p); ++c) {
                const int col = get<1>(coords(r, c));
                bool visible = col < block.keys_in_block;
                if constexpr (kIsMasked) {
                    const int offset = block.key_begin + col - row;
                    visible = visible && offset >= params.mask.key_offset_min && offset <= params.mask.key_offset_max;
                }
                if (!visible) p(r, c) = 0.f;
            }
        }
    }
}

// dS = scale * P o (dP - delta) in place of dP (both viewed as (rows, cols)), P read back from its
// 16-bit copy as pairs of adjacent columns, one 32-bit register each (for bf16 two bit operations
// per pair; element by element the SASS took about three). dS uses the same rounded P as dV.
template <int kRows, typename Grads, typename Probs>
__device__ __forceinline__ void probability_grads_to_score_grads(Grads& ds, const Probs& p16, float scale,
                                                                 const float (&scaled_delta)[kRows]) {
    using namespace cute;
    static_assert(decltype(shape<1, 0>(p16.layout()))::value == 2 && decltype(stride<1, 0>(p16.layout()))::value == 1,
                  "columns 2j and 2j + 1 of a row are adjacent in the register fragment");
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(ds); c += 2) {
            const float2 p_pair = unpack_pair(&p16(r, c));
            ds(r, c) = p_pair.x * (ds(r, c) * scale - scaled_delta[r]);
            ds(r, c + 1) = p_pair.y * (ds(r, c + 1) * scale - scaled_delta[r]);
        }
    }
}

// dQ staging (Traits::kStageDq, Hopper): after a query block's dQ = dS K, every thread stores its
// fragment into the fp32 staging tile and fences the stores for the TMA; after the next barrier
// thread 0 issues one bulk tensor reduction per 8-column slice into dq_accum (rows past seqlen_q
// fall outside the descriptor's tensor and are skipped; in a varlen launch, whose descriptor spans all
// sequences, they are the next sequence's rows and receive exact zeros, since P and dS are 0 in rows
// past seqlen_q), and before the tile is rewritten, a block later, waits until the TMA has read it.
// The barrier that already separates two query blocks orders the stores before the reductions, so
// staging adds none; the adds leave the SM as a few TMA requests instead of 16 atomics per thread (no
// LSU throttling of the warps).
// map_row0: where row 0 of this CTA's queries sits in the descriptor (a varlen sequence's first
// packed row; 0 otherwise).
template <typename Traits>
__device__ __forceinline__ void reduce_staged_dq(const CUtensorMap& dq_map, const float* smem_dq, int first_row,
                                                 int map_row0, int head, int batch) {
    if (threadIdx.x == 0 && first_row >= 0) {
        CUTE_UNROLL
        for (int slice = 0; slice < Traits::kHeadDim / kDqSliceCols; ++slice) {
            tma_reduce_add_4d(&dq_map, smem_dq + slice * Traits::kBlockM * kDqSliceCols, slice * kDqSliceCols,
                              map_row0 + first_row, head, batch);
        }
        commit_bulk_group();
    }
}

// Epilogue: dK and dV of the key block, written in the input dtype, or written over or added into
// the caller's fp32 accumulators. With GQA several query heads (CTAs) add into the same tile, so the
// adds must be atomic then. thr_dkv: the dK/dV product's thread slice, which partitions the
// accumulators; smem_q: the Q and dO buffers, free once every warp is past the loop.
template <typename Traits, typename ThrMma, typename Acc>
__device__ __forceinline__ void write_dk_dv(const BwdParams& params, const KeyBlock& block, const ThrMma& thr_dkv,
                                            const Acc& acc_dk, const Acc& acc_dv,
                                            typename Traits::Element* smem_q) {
    using namespace cute;
    using Element = typename Traits::Element;
    using TileKV = Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>;
    constexpr int kBlockN = Traits::kBlockN;
    Tensor tdKVcdKV = thr_dkv.partition_C(make_identity_tensor(TileKV{}));
    if (params.dk_out != nullptr) {
        // The tiles go through shared memory so that global memory sees 16-byte stores of whole row
        // segments instead of the fragments' 4-byte pairs.
        static_assert(2 * Traits::kSizeKV <= 2 * Traits::kSizeQ, "dK and dV fit in the Q and dO buffers");
        Tensor sdK = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutKV{});
        Tensor sdV = make_tensor(make_smem_ptr(smem_q + Traits::kSizeKV), typename Traits::SmemLayoutKV{});
        Tensor rdK = convert_fragment<Element>(acc_dk);
        Tensor rdV = convert_fragment<Element>(acc_dv);
        __syncthreads();  // every warp is done reading Q and dO
        copy(rdK, thr_dkv.partition_C(sdK));
        copy(rdV, thr_dkv.partition_C(sdV));
        __syncthreads();
        Tensor gdK = make_tensor(make_gmem_ptr(static_cast<Element*>(params.dk_out) + block.dk_offset), TileKV{},
                                 make_stride(params.dk_row_stride, _1{}));
        Tensor gdV = make_tensor(make_gmem_ptr(static_cast<Element*>(params.dv_out) + block.dv_offset), TileKV{},
                                 make_stride(params.dv_row_stride, _1{}));
        typename Traits::GmemTiledStore gmem_store;
        auto store_thr = gmem_store.get_thread_slice(threadIdx.x);
        Tensor tsdK = store_thr.partition_S(sdK);
        Tensor tgdK = store_thr.partition_D(gdK);
        Tensor tsdV = store_thr.partition_S(sdV);
        Tensor tgdV = store_thr.partition_D(gdV);
        Tensor tcKV = store_thr.partition_D(make_identity_tensor(TileKV{}));
        CUTE_UNROLL
        for (int m = 0; m < size<1>(tsdK); ++m) {
            if (get<0>(tcKV(0, m, 0)) < block.keys_in_block) {
                copy(gmem_store, tsdK(_, m, _), tgdK(_, m, _));
                copy(gmem_store, tsdV(_, m, _), tgdV(_, m, _));
            }
        }
        return;
    }
    Tensor gdK = make_tensor(make_gmem_ptr(params.dk_accum + block.dk_offset), TileKV{},
                             make_stride(params.dk_row_stride, _1{}));
    Tensor gdV = make_tensor(make_gmem_ptr(params.dv_accum + block.dv_offset), TileKV{},
                             make_stride(params.dv_row_stride, _1{}));
    const bool dk_aligned = pairs_aligned(params.dk_accum, params.dk_batch_stride, params.dk_row_stride,
                                          params.dk_head_stride);
    const bool dv_aligned = pairs_aligned(params.dv_accum, params.dv_batch_stride, params.dv_row_stride,
                                          params.dv_head_stride);
    if (params.heads != params.heads_kv) {
        add_fragment<FragmentOp::kAtomicAdd, kBlockN>(acc_dk, thr_dkv.partition_C(gdK), tdKVcdKV,
                                                      block.keys_in_block, dk_aligned);
        add_fragment<FragmentOp::kAtomicAdd, kBlockN>(acc_dv, thr_dkv.partition_C(gdV), tdKVcdKV,
                                                      block.keys_in_block, dv_aligned);
    } else {
        add_fragment<FragmentOp::kAdd, kBlockN>(acc_dk, thr_dkv.partition_C(gdK), tdKVcdKV, block.keys_in_block,
                                                dk_aligned, params.dkv_overwrite);
        add_fragment<FragmentOp::kAdd, kBlockN>(acc_dv, thr_dkv.partition_C(gdV), tdKVcdKV, block.keys_in_block,
                                                dv_aligned, params.dkv_overwrite);
    }
}

}  // namespace bwd
}  // namespace ring_attn
