// Small device helpers of the backward kernel: the shared-memory matrix product, register layout
// views, conversion and global fp32 accumulation.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace ring_attn {
namespace bwd {

// acc += A * B over the whole K extent of the fragments. Operands come from shared memory through
// the given ldmatrix copies; the load of k-slice i + 1 is issued before the MMAs of slice i so the
// two overlap.
template <typename TiledMma, typename Acc, typename FragA, typename FragB, typename SmemA, typename SmemB,
          typename CopyA, typename CopyB>
__device__ __forceinline__ void gemm_smem(const TiledMma& mma, Acc& acc, FragA& tCrA, FragB& tCrB, const SmemA& tCsA,
                                          const SmemB& tCsB, const CopyA& copy_a, const CopyB& copy_b) {
    using namespace cute;
    // The register fragments re-viewed in the copies' (value, rows, k) order.
    Tensor tCrA_view = make_tensor(tCrA.data(), CopyA::retile(tCrA.layout()));
    Tensor tCrB_view = make_tensor(tCrB.data(), CopyB::retile(tCrB.layout()));
    CUTE_STATIC_ASSERT_V(size<1>(tCsA) == size<1>(tCrA_view));
    CUTE_STATIC_ASSERT_V(size<1>(tCsB) == size<1>(tCrB_view));
    CUTE_STATIC_ASSERT_V(size<2>(tCrA) == size<2>(tCrB));
    copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
    copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tCrA); ++k) {
        if (k + 1 < size<2>(tCrA)) {
            copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
            copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
        }
        cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
    }
}

// An m16n8 accumulator fragment ((2 cols, 2 rows), MMA_M, MMA_N) viewed as
// (rows = (2, MMA_M), cols = (2, MMA_N)), so row-wise quantities index it directly.
template <typename Layout>
__device__ __forceinline__ auto accumulator_rows_cols(const Layout& acc) {
    using namespace cute;
    static_assert(decltype(rank(acc))::value == 3);
    static_assert(decltype(size<0>(acc))::value == 4);
    auto split = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
    return make_layout(make_layout(get<0, 1>(split), get<1>(split)), make_layout(get<0, 0>(split), get<2>(split)));
}

// fp32 fragment -> register fragment of To with the same (compact) layout, converted in pairs
// where the type has paired conversions.
template <typename To, typename Engine, typename Layout>
__device__ __forceinline__ auto convert_fragment(const cute::Tensor<Engine, Layout>& src) {
    using namespace cute;
    using From = typename Engine::value_type;
    constexpr int kSize = decltype(size(src))::value;
    static_assert(decltype(cosize(src.layout()))::value == kSize, "expects a compact fragment");
    cutlass::NumericArrayConverter<To, From, kSize> convert;
    Tensor dst = make_tensor<To>(src.layout());
    *reinterpret_cast<cutlass::Array<To, kSize>*>(dst.data()) =
        convert(*reinterpret_cast<const cutlass::Array<From, kSize>*>(src.data()));
    return dst;
}

// Hopper has a vector atomic for an 8-byte aligned float pair: one instruction instead of two.
template <bool kPairAligned>
__device__ __forceinline__ void atomic_add_pair(float* address, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kPairAligned) {
        atomicAdd(reinterpret_cast<float2*>(address), make_float2(x, y));
        return;
    }
#endif
    atomicAdd(address, x);
    atomicAdd(address + 1, y);
}

// Adds a fragment of an m16n8 accumulator, times `scale`, into fp32 global memory: `dst` and
// `coord` are the same tile partitioned like the accumulator (partition_C), and only rows below
// `rows` are written. Each thread's values come in pairs of adjacent columns; with 8-byte aligned
// pairs they move as float2.
// kAtomic: several CTAs add into the same addresses; otherwise a plain read-add-write.
template <bool kAtomic, bool kPairAligned, typename Acc, typename Dst, typename Coord>
__device__ __forceinline__ void add_fragment_impl(const Acc& acc, Dst& dst, const Coord& coord, int rows, float scale) {
    using namespace cute;
    CUTE_UNROLL
    for (int mi = 0; mi < size<1>(acc); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < size<2>(acc); ++ni) {
            CUTE_UNROLL
            for (int half = 0; half < 2; ++half) {
                const auto first = make_coord(make_coord(0, half), mi, ni);
                const auto second = make_coord(make_coord(1, half), mi, ni);
                if (get<0>(coord(first)) >= rows) continue;
                float* address = &dst(first);
                // Rounded products (no fused multiply-add into the accumulator): adding into a
                // prefilled accumulator then equals adding this call's own result to it.
                const float x = __fmul_rn(acc(first), scale), y = __fmul_rn(acc(second), scale);
                if constexpr (kAtomic) {
                    atomic_add_pair<kPairAligned>(address, x, y);
                } else if constexpr (kPairAligned) {
                    float2 value = *reinterpret_cast<float2*>(address);
                    value.x += x;
                    value.y += y;
                    *reinterpret_cast<float2*>(address) = value;
                } else {
                    address[0] += x;
                    address[1] += y;
                }
            }
        }
    }
}

template <bool kAtomic, typename Acc, typename Dst, typename Coord>
__device__ __forceinline__ void add_fragment(const Acc& acc, Dst&& dst, const Coord& coord, int rows, float scale,
                                             bool pair_aligned) {
    if (pair_aligned) {
        add_fragment_impl<kAtomic, true>(acc, dst, coord, rows, scale);
    } else {
        add_fragment_impl<kAtomic, false>(acc, dst, coord, rows, scale);
    }
}

// Whether every (column-even) pair of an fp32 (batch, rows, heads, cols) tensor is 8-byte aligned.
__device__ __forceinline__ bool pairs_aligned(const float* base, int64_t batch_stride, int64_t row_stride,
                                              int64_t head_stride) {
    return reinterpret_cast<uintptr_t>(base) % 8 == 0 && batch_stride % 2 == 0 && row_stride % 2 == 0 &&
           head_stride % 2 == 0;
}

}  // namespace bwd
}  // namespace ring_attn
