// The order in which the backward kernel's CTAs start. Each CTA computes one (key block, batch,
// head) tile; CTAs start in blockIdx order (x fastest, then y, then z), which decides two things:
// which CTAs run at the same time (those of one (batch, head) pair read the same Q, dO, lse and delta
// rows, walking them in the same direction, so together they hit in L2) and which run last (while
// the final CTAs run, SMs with nothing left idle: the grid's tail).
//
// Under a causal mask key block n of a pair is seen by fewer query blocks the larger n is (key block
// 0 by all of them). In the plain order (every key block of one pair, then the next pair) the last
// pairs' longest CTAs start less than a wave before the end and the other SMs wait for them: in an
// ideal list-scheduling model of a causal h16 d128 grid on 132 SMs the plain order ends 3.7% (b16
// s2k), 2.9% (b4 s8k) or 11.5% (b1 s8k) after the ideal time. Key-block-major orders start a group
// of pairs' longest CTAs first and end on short ones (0.1-1% in that model): the pairs of one head
// across the batch, or of one batch across the heads.
//
// Measured on an H200 (causal backward, h16 d128, against the plain order, fp16 and bf16): b1 s8k
// +7-8% (the heads of the one batch entry), b16 s2k +1.3%, b8 s4k +2%, b4 s8k +1.5%, b2 s16k +0.3-0.7%
// (one head across the batch).
//
// The group must stay small enough that each pair keeps several CTAs in flight, walking its Q and dO
// rows together: one group of all pairs ran 5-8% slower than the plain order at b4 s8k (64 pairs,
// about 2 CTAs per pair in flight) and 12-17% at b16 s2k (256 pairs). Groups of at most SMs / 8 pairs
// keep about 8 in flight.
//
// The order is a template argument of the kernel and the grid is shaped for it, so that every
// coordinate is a blockIdx component: ptxas re-reads blockIdx wherever the loop needs a coordinate,
// whereas one computed at run time and held across the loop costs registers and, in the d128
// kernels, spills (measured: about 20 bytes more, 2-7 local loads per query block in the loop).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "flash_params.h"

namespace ring_attn {
namespace bwd {

// Queries [begin, end) that see at least one key of [key_begin, key_end). Key j is visible to query
// i iff key_offset_min <= j - i <= key_offset_max; the host clamps both offsets into
// [-seqlen_q, seqlen_k], so nothing here overflows.
struct QueryRange {
    int begin, end;
};

template <bool kIsMasked>
__host__ __device__ __forceinline__ QueryRange visible_queries(const BwdParams& params, int key_begin, int key_end) {
    QueryRange range{0, params.seqlen_q};
    if constexpr (kIsMasked) {
        range.begin = std::max(0, key_begin - params.mask.key_offset_max);
        range.end = std::min(params.seqlen_q, key_end - params.mask.key_offset_min);
    }
    return range;
}

// How the grid's (x, y, z) map to (key block, batch, head).
enum class CtaOrder {
    kPlain,              // (key block, batch, head)
    kBatchesByKeyBlock,  // (batch, key block, head): a group is one head across the batch
    kHeadsByKeyBlock,    // (head, key block, batch): a group is one batch entry across the heads
};

// Host: the order for a launch. Key-block-major orders only where key block 0 is the most seen (a
// band with an upper edge, as causal masks have) and a group of at most num_sms / 8 pairs exists.
template <int kBlockN, bool kIsMasked>
CtaOrder choose_cta_order(const BwdParams& params, int num_sms) {
    if constexpr (!kIsMasked) {
        return CtaOrder::kPlain;
    } else {
        const int n_blocks = (params.seqlen_k + kBlockN - 1) / kBlockN;
        auto queries_seeing = [&](int n_block) {
            const QueryRange range = visible_queries<true>(params, n_block * kBlockN,
                                                           std::min(params.seqlen_k, (n_block + 1) * kBlockN));
            return std::max(0, range.end - range.begin);
        };
        // gridDim.y, which holds the key blocks in the key-block-major orders, is at most 65535.
        if (n_blocks > 65535 || queries_seeing(0) <= queries_seeing(n_blocks - 1)) return CtaOrder::kPlain;
        const int max_group = std::max(1, num_sms / 8);
        if (params.batch >= 2 && params.batch <= max_group) return CtaOrder::kBatchesByKeyBlock;
        if (params.heads >= 2 && params.heads <= max_group) return CtaOrder::kHeadsByKeyBlock;
        return CtaOrder::kPlain;
    }
}

template <int kBlockN>
dim3 cta_grid(CtaOrder order, const BwdParams& params) {
    const unsigned n_blocks = (params.seqlen_k + kBlockN - 1) / kBlockN;
    switch (order) {
        case CtaOrder::kBatchesByKeyBlock:
            return dim3(params.batch, n_blocks, params.heads);
        case CtaOrder::kHeadsByKeyBlock:
            return dim3(params.heads, n_blocks, params.batch);
        default:
            return dim3(n_blocks, params.batch, params.heads);
    }
}

struct CtaTile {
    int n_block, batch, head;
};

// Device: this CTA's tile, from the grid cta_grid shaped for kOrder.
template <CtaOrder kOrder>
__device__ __forceinline__ CtaTile cta_tile() {
    if constexpr (kOrder == CtaOrder::kBatchesByKeyBlock) {
        return {int(blockIdx.y), int(blockIdx.x), int(blockIdx.z)};
    } else if constexpr (kOrder == CtaOrder::kHeadsByKeyBlock) {
        return {int(blockIdx.y), int(blockIdx.z), int(blockIdx.x)};
    } else {
        return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
    }
}

}  // namespace bwd
}  // namespace ring_attn
