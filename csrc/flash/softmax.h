// Online softmax over key blocks, in fp32, for one thread's rows of an m16n8 accumulator.
//
// Scores stay unscaled in the accumulator; the softmax scale is folded into base-2 exponentials:
//     p = exp2(s * scale_log2 - m * scale_log2),   scale_log2 = softmax_scale * log2(e),
// which compiles to one FFMA + one MUFU.EX2 per score. For each new block of scores:
//     m' = max(m, rowmax(s));   alpha = exp2((m - m') * scale_log2);
//     l' = alpha * l + rowsum(p);   O' = alpha * O + P V   (the caller does the P V part).
// The row sum stays a per-thread partial until finalize(); the row max is reduced over the quad of
// lanes sharing the row every block, because every lane needs it for its exponentials.
//
// A row can see no key at all so far (masked bands): then m' = -inf and the exponent offset is taken
// as 0 so that exp2(-inf - offset) = 0 instead of exp2(-inf + inf) = NaN. finalize() maps such rows
// (l = 0) to O = 0 and lse = -inf.
#pragma once

#include <cute/tensor.hpp>

#include "utils.h"

namespace ring_attn {
namespace flash {

using namespace cute;

template <int kRows>
struct OnlineSoftmax {
    float row_max[kRows];
    float row_sum[kRows];

    CUTE_DEVICE OnlineSoftmax() {
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            row_max[r] = -INFINITY;
            row_sum[r] = 0.f;
        }
    }

    // Turns the scores `acc_s` (an (MMA, MMA_M, MMA_N) fp32 accumulator) into unnormalised
    // probabilities in place and rescales the output accumulator `acc_o` for the new row maxima.
    // kMayHaveEmptyRows: rows may have seen only masked (-inf) scores so far.
    // is_first: the tile's first key block; O and l are still zero, so the rescale is skipped. The
    // branch also splits the softmax into separate scheduling regions for ptxas: measured with nvcc
    // 13.0 for sm_90a, the branch-free form let the scheduler interleave the rescale and the
    // exponentials with P.V and cost the hot loop ~130 register moves and ~30 spill accesses.
    template <bool kMayHaveEmptyRows, class AccS, class AccO>
    CUTE_DEVICE void update(AccS& acc_s, AccO& acc_o, float scale_log2, bool is_first) {
        Tensor s = make_tensor(acc_s.data(), accumulator_rowcol(acc_s.layout()));  // (kRows, cols)
        Tensor o = make_tensor(acc_o.data(), accumulator_rowcol(acc_o.layout()));  // (kRows, head_dim cols)
        static_assert(decltype(size<0>(s))::value == kRows, "row count mismatch");
        // Every row's maximum first, then their quad reductions: the shuffles of different rows
        // overlap instead of each waiting on the previous one.
        float new_max[kRows];
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            new_max[r] = row_max[r];
            CUTE_UNROLL
            for (int c = 0; c < size<1>(s); ++c) new_max[r] = fmaxf(new_max[r], s(r, c));
        }
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) new_max[r] = quad_max(new_max[r]);
        float offset[kRows];
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            offset[r] = (kMayHaveEmptyRows && new_max[r] == -INFINITY) ? 0.f : new_max[r] * scale_log2;
        }
        if (!is_first) {
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) {
                const float alpha = exp2f(row_max[r] * scale_log2 - offset[r]);
                row_sum[r] *= alpha;
                CUTE_UNROLL
                for (int c = 0; c < size<1>(o); ++c) o(r, c) *= alpha;
            }
        }
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            row_max[r] = new_max[r];
            CUTE_UNROLL
            for (int c = 0; c < size<1>(s); ++c) {
                s(r, c) = exp2f(s(r, c) * scale_log2 - offset[r]);
                row_sum[r] += s(r, c);
            }
        }
    }

    // Normalises acc_o by the row sums and returns the natural-log LSE of each row
    // (m * softmax_scale + ln l), -inf for rows that saw no key (their output becomes 0).
    template <class AccO>
    CUTE_DEVICE void finalize(AccO& acc_o, float softmax_scale, float (&lse)[kRows]) {
        Tensor o = make_tensor(acc_o.data(), accumulator_rowcol(acc_o.layout()));
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            const float sum = quad_sum(row_sum[r]);
            const bool empty = !(sum > 0.f);  // also true for NaN
            const float inv_sum = empty ? 0.f : 1.f / sum;
            lse[r] = empty ? -INFINITY : row_max[r] * softmax_scale + logf(sum);
            CUTE_UNROLL
            for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv_sum;
        }
    }
};

}  // namespace flash
}  // namespace ring_attn
