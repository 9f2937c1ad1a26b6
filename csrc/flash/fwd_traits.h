// Forward-kernel traits: one CTA computes a (kBlockM query rows) x (head_dim) output tile, walking
// over kBlockN-wide key blocks. Shared memory holds Q (kBlockM x d), one K block and one V block
// (kBlockN x d each); the output tile is staged through the Q buffer in the epilogue.
#pragma once

#include "kernel_traits.h"

namespace ring_attn {
namespace flash {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits : AttentionTraitsBase<Element_, kHeadDim_, kNWarps_> {
    using Base = AttentionTraitsBase<Element_, kHeadDim_, kNWarps_>;
    using Element = typename Base::Element;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static_assert(kBlockM % (16 * kNWarps_) == 0, "each warp owns whole 16-row slabs");
    static_assert(kBlockN % 16 == 0, "P.V consumes keys 16 at a time");

    using SmemLayoutQ = typename Base::template SmemTile<kBlockM>;    // also the output staging tile
    using SmemLayoutKV = typename Base::template SmemTile<kBlockN>;
    using SmemLayoutVt = typename Base::template SmemTileTransposed<kBlockN>;

    static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kHeadDim_;
    static constexpr int kSmemBytes = kSmemElems * static_cast<int>(sizeof(Element));

    // Score rows held by one thread: rows r and r+8 of each 16-row MMA slab it owns.
    static constexpr int kRowsPerThread = 2 * kBlockM / (16 * kNWarps_);
};

}  // namespace flash
}  // namespace ring_attn
