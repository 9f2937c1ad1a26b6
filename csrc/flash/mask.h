// Band masks on a tile of scores. Key j is visible to query i iff 0 <= j < seqlen_k and
// key_offset_min <= j - i <= key_offset_max (see MaskBand in flash_params.h). Invisible scores
// become -inf before the softmax.
//
// Which key blocks a query block must visit, and which of them need per-element masking, are
// block-level questions answered here too, so the forward and backward kernels agree on them.
#pragma once

#include <cute/tensor.hpp>

#include "flash_params.h"
#include "utils.h"

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

// The key blocks of `blocks` whose (kBlockM x kBlockN) score tile at query row row0 needs no
// per-element mask: every key is < seqlen_k and (masked kernels) inside the band for every row of the
// tile. Such blocks form one contiguous range [begin, end): the key tail and the band's upper edge
// only cut blocks at the high end, the band's lower edge only at the low end. An empty range comes
// back as {blocks.begin, blocks.begin}, so a caller walking down from blocks.end - 1 masks every block.
template <int kBlockM, int kBlockN, bool kIsMasked>
CUTE_HOST_DEVICE BlockRange unmasked_key_blocks(int row0, int seqlen_k, MaskBand band, BlockRange blocks) {
    // Block n is clear of the high cuts iff (n + 1) * kBlockN <= keys_below, of the low cut iff
    // n * kBlockN >= lowest_clear_key.
    int keys_below = seqlen_k;
    int lowest_clear_key = 0;
    if constexpr (kIsMasked) {
        // Row i sees keys up to i + key_offset_max; the tile's first row sees the fewest.
        keys_below = min(keys_below, row0 + band.key_offset_max + 1);
        // Row i sees keys from i + key_offset_min; the tile's last row starts the latest.
        lowest_clear_key = row0 + kBlockM - 1 + band.key_offset_min;
    }
    const int end = min(blocks.end, keys_below > 0 ? keys_below / kBlockN : 0);
    const int begin = max(blocks.begin, lowest_clear_key > 0 ? (lowest_clear_key + kBlockN - 1) / kBlockN : 0);
    if (begin >= end) return {blocks.begin, blocks.begin};
    return {begin, end};
}

// The backward's question, for a key block instead of a query block: the query blocks of `blocks`
// whose (kBlockM x kBlockN) tile with keys [key_begin, key_begin + kBlockN) needs no per-element
// mask under the band (banded kernels only; the caller handles a key tail, which masks every block).
// Row i of the tile is clear iff it sees the block's first and last key:
// i <= key_begin - key_offset_min and i >= key_begin + kBlockN - 1 - key_offset_max. So the band's
// upper edge cuts blocks at the low end, its lower edge at the high end. Rows past seqlen_q are
// treated like real rows (their P is 0 anyway), which at worst masks one more block. Empty comes
// back as {blocks.begin, blocks.begin}.
template <int kBlockM, int kBlockN>
CUTE_HOST_DEVICE BlockRange unmasked_query_blocks(int key_begin, MaskBand band, BlockRange blocks) {
    // The host clamps the band into [-seqlen_q, seqlen_k], so these sums fit in int32.
    const int lowest_clear_row = key_begin + kBlockN - 1 - band.key_offset_max;
    const int rows_below = key_begin - band.key_offset_min + 1;  // clear rows end here
    const int begin = max(blocks.begin, lowest_clear_row > 0 ? (lowest_clear_row + kBlockM - 1) / kBlockM : 0);
    const int end = min(blocks.end, rows_below > 0 ? rows_below / kBlockM : 0);
    if (begin >= end) return {blocks.begin, blocks.begin};
    return {begin, end};
}

// Sets invisible entries of an accumulator fragment of scores to -inf. `coords` is the same
// partition of an identity tensor over the (kBlockM, kBlockN) tile: coords(i) = (row, col) in the
// tile. Both are viewed as (rows, cols) so each row's visible key interval is computed once.
template <bool kIsMasked, class Scores, class Coords>
CUTE_DEVICE void apply_band_mask(Scores& scores, Coords const& coords, int row0, int col0, int seqlen_k,
                                 MaskBand band) {
    Tensor s = make_tensor(scores.data(), accumulator_rowcol(scores.layout()));  // (rows, cols)
    Tensor c = make_tensor(coords.data(), accumulator_rowcol(coords.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(s); ++r) {
        // Visible tile columns of this row: [first, last], in tile coordinates.
        const int row = row0 + get<0>(c(r, 0));
        int last = seqlen_k - 1 - col0;
        int first = 0;
        if constexpr (kIsMasked) {
            last = min(last, row + band.key_offset_max - col0);
            first = row + band.key_offset_min - col0;
        }
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
            const int col = get<1>(c(r, j));
            if (col > last || (kIsMasked && col < first)) s(r, j) = -INFINITY;
        }
    }
}

}  // namespace flash
}  // namespace ring_attn
