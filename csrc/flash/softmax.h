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
    template <bool kMayHaveEmptyRows, class AccS, class AccO>
    CUTE_DEVICE void update(AccS& acc_s, AccO& acc_o, float scale_log2, bool is_first_block) {
        Tensor s = make_tensor(acc_s.data(), accumulator_rowcol(acc_s.layout()));  // (kRows, cols)
        Tensor o = make_tensor(acc_o.data(), accumulator_rowcol(acc_o.layout()));  // (kRows, head_dim cols)
        static_assert(decltype(size<0>(s))::value == kRows, "row count mismatch");
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
            const float old_max = row_max[r];
            float new_max = old_max;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(s); ++c) new_max = fmaxf(new_max, s(r, c));
            new_max = quad_max(new_max);
            row_max[r] = new_max;
            const float offset = (kMayHaveEmptyRows && new_max == -INFINITY) ? 0.f : new_max * scale_log2;
            if (!is_first_block) {
                // old_max = -inf (nothing seen yet) gives alpha = 0, and O and l are 0 then anyway.
                const float alpha = exp2f(old_max * scale_log2 - offset);
                row_sum[r] *= alpha;
                CUTE_UNROLL
                for (int c = 0; c < size<1>(o); ++c) o(r, c) *= alpha;
            }
            float sum = 0.f;
            CUTE_UNROLL
            for (int c = 0; c < size<1>(s); ++c) {
                s(r, c) = exp2f(s(r, c) * scale_log2 - offset);
                sum += s(r, c);
            }
            row_sum[r] += sum;
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
