// Band masks on a tile of scores. Key j is visible to query i iff 0 <= j < seqlen_k and
// key_offset_min <= j - i <= key_offset_max (see MaskBand in flash_params.h). Invisible scores
// become -inf before the softmax.
//
// Which key blocks a query block must visit, and which of them need per-element masking, are
// block-level questions answered here too, so the forward and backward kernels agree on them.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"

namespace ring_attn {
namespace flash {

using namespace cute;

// Half-open range [begin, end) of kBlockN-wide key blocks that hold at least one key visible to a
// query row in [row_begin, row_end). Empty (begin >= end) when no row sees any key.
struct BlockRange {
    int begin;
    int end;
};

template <int kBlockN, bool kIsMasked>
CUTE_HOST_DEVICE BlockRange key_blocks_for_rows(int row_begin, int row_end, int seqlen_k, MaskBand band) {
    if constexpr (!kIsMasked) {
        return {0, (seqlen_k + kBlockN - 1) / kBlockN};
    } else {
        // The host clamps the band into [-seqlen_q, seqlen_k], so these sums fit in int32.
        const int lowest = row_begin + band.key_offset_min;
        const int highest = row_end - 1 + band.key_offset_max;
        const int first_key = lowest > 0 ? lowest : 0;
        const int last_key = highest < seqlen_k - 1 ? highest : seqlen_k - 1;
        if (first_key > last_key) return {0, 0};
        return {first_key / kBlockN, last_key / kBlockN + 1};
    }
}

// Whether a (kBlockM x kBlockN) block of scores at (row0, col0) has any element that is invisible:
// past the end of the keys, or (masked kernels) outside the band for some row of the block.
template <int kBlockM, int kBlockN, bool kIsMasked>
CUTE_DEVICE bool block_needs_mask(int row0, int col0, int seqlen_k, MaskBand band) {
    if (col0 + kBlockN > seqlen_k) return true;
    if constexpr (kIsMasked) {
        // j - i over the block spans [col0 - (row0 + kBlockM - 1), col0 + kBlockN - 1 - row0].
        return col0 - (row0 + kBlockM - 1) < band.key_offset_min || col0 + kBlockN - 1 - row0 > band.key_offset_max;
    }
    return false;
}

// Sets invisible entries of an accumulator fragment of scores to -inf. `coords` is the same
// partition of an identity tensor over the (kBlockM, kBlockN) tile: coords(i) = (row, col) in the tile.
template <bool kIsMasked, class Scores, class Coords>
CUTE_DEVICE void apply_band_mask(Scores& scores, Coords const& coords, int row0, int col0, int seqlen_k,
                                 MaskBand band) {
    CUTE_UNROLL
    for (int i = 0; i < size(scores); ++i) {
        const int row = row0 + get<0>(coords(i));
        const int col = col0 + get<1>(coords(i));
        bool visible = col < seqlen_k;
        if constexpr (kIsMasked) {
            visible = visible && col - row >= band.key_offset_min && col - row <= band.key_offset_max;
        }
        if (!visible) scores(i) = -INFINITY;
    }
}

}  // namespace flash
}  // namespace ring_attn
