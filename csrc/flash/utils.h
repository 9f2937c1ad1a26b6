// Small device helpers of the forward kernel: the tensor-core product with A in registers,
// re-views of MMA accumulator fragments, fragment dtype conversion, quad reductions and
// row-predicated global->shared copies.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace ring_attn {
namespace flash {

using namespace cute;

// acc += A * B^T with A already in registers (e.g. the probabilities P) and B in shared memory,
// pipelined like gemm_smem (gemm_smem.h).
template <class Acc, class RegA, class RegB, class SmemB, class TiledMma, class CopyB, class ThrCopyB>
CUTE_DEVICE void gemm_reg_smem(Acc& acc, RegA const& rA, RegB& rB, SmemB const& sB, TiledMma const& tiled_mma,
                               CopyB const& copy_b, ThrCopyB const& thr_copy_b) {
    Tensor rB_copy = thr_copy_b.retile_D(rB);
    CUTE_STATIC_ASSERT_V(size<2>(rB) == size<2>(rB_copy));
    copy(copy_b, sB(_, _, 0), rB_copy(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < size<2>(rA); ++k) {
        if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_copy(_, _, k + 1));
        cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
    }
}

// An m16n8 accumulator fragment has layout ((2 cols, 2 rows), MMA_M, MMA_N): per atom a thread holds
// columns (c, c+1) of rows r and r+8. This re-view is (rows, cols) = ((2, MMA_M), (2, MMA_N)), so
// row-wise softmax code can index rows and columns directly.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto accumulator_rowcol(Layout const& acc) {
    static_assert(decltype(rank(acc))::value == 3, "expected an (MMA, MMA_M, MMA_N) accumulator");
    static_assert(decltype(size<0>(acc))::value == 4, "expected m16n8 accumulator atoms");
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The accumulator of an m16n8k16 product re-viewed as the A operand of the next m16n8k16 product:
// two neighbouring n8 atoms hold exactly the 16 columns (k values) one A atom needs, in A's register
// order. ((2,2), MMA_M, MMA_N) -> (((2,2),2), MMA_M, MMA_N/2). This keeps P in registers for P.V.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto accumulator_as_operand_a(Layout const& acc) {
    static_assert(decltype(size<2>(acc))::value % 2 == 0, "need an even number of n8 atoms");
    auto split = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), MMA_M, (2, MMA_N/2))
    return make_layout(make_layout(get<0>(split), get<2, 0>(split)), get<1>(split), get<2, 1>(split));
}

// A register fragment converted element-wise to `To` (packed conversions, e.g. cvt.rn.bf16x2.f32),
// keeping its layout.
template <typename To, class Engine, class Layout>
CUTE_DEVICE auto convert_fragment(Tensor<Engine, Layout> const& src) {
    using From = typename Engine::value_type;
    constexpr int kSize = decltype(size(src))::value;
    Tensor dst = make_tensor<To>(src.layout());
    cutlass::NumericArrayConverter<To, From, kSize> convert;
    *reinterpret_cast<cutlass::Array<To, kSize>*>(dst.data()) =
        convert(*reinterpret_cast<const cutlass::Array<From, kSize>*>(src.data()));
    return dst;
}

// Reductions over the 4 lanes of a quad (the lanes that share an accumulator row).
CUTE_DEVICE float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
CUTE_DEVICE float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Global -> shared copy of a (rows, head_dim) tile partitioned by a zero-fill cp.async TiledCopy:
// rows at or past `valid_rows` are not read and land as zeros, so padding never feeds NaN or Inf into
// the products. `coords` is the same partition of an identity tensor (the tile's row/col indices).
template <class TiledCopy, class Src, class Dst, class Coords>
CUTE_DEVICE void copy_rows_zfill(TiledCopy const& tiled_copy, Src const& src, Dst&& dst, Coords const& coords,
                                 int valid_rows) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(src); ++m) {
        const bool in_range = get<0>(coords(0, m, 0)) < valid_rows;
        copy(tiled_copy.with(in_range), src(_, m, _), dst(_, m, _));
    }
}

}  // namespace flash
}  // namespace ring_attn
