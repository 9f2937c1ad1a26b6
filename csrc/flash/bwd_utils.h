// Small device helpers of the backward kernel: register layout views, conversion, global fp32
// accumulation and the TMA reductions of the staged dQ.
#pragma once

#include <cuda.h>
#include <cuda_fp16.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "gemm_smem.h"

namespace ring_attn {
namespace bwd {

// A warpgroup MMA (wgmma) accumulator fragment ((2 cols, 2 rows, N / 8), MMA_M, MMA_N) holds, per
// warp, what N / 8 m16n8 fragments side by side would: as_m16n8 views its layout in the m16n8 form
// ((2 cols, 2 rows), MMA_M, (N / 8, MMA_N)), so the helpers below serve both. An m16n8 layout, or a
// tensor with one, is returned as it is.
template <typename Layout>
__device__ __forceinline__ constexpr bool is_gmma_fragment() {
    return decltype(cute::rank<0>(std::declval<Layout>()))::value == 3;
}
template <typename Layout, std::enable_if_t<cute::is_layout<Layout>::value, int> = 0>
__device__ __forceinline__ auto as_m16n8(const Layout& layout) {
    using namespace cute;
    if constexpr (is_gmma_fragment<Layout>()) {
        return make_layout(make_layout(get<0, 0>(layout), get<0, 1>(layout)), get<1>(layout),
                           make_layout(get<0, 2>(layout), get<2>(layout)));
    } else {
        return layout;
    }
}
template <typename T, std::enable_if_t<cute::is_tensor<std::decay_t<T>>::value, int> = 0>
__device__ __forceinline__ decltype(auto) as_m16n8(T&& tensor) {
    if constexpr (is_gmma_fragment<std::decay_t<decltype(tensor.layout())>>()) {
        return cute::make_tensor(tensor.data(), as_m16n8(tensor.layout()));
    } else {
        return std::forward<T>(tensor);
    }
}

// An m16n8 accumulator fragment ((2 cols, 2 rows), MMA_M, MMA_N) (or a wgmma one, through as_m16n8)
// viewed as (rows = (2, MMA_M), cols = (2, MMA_N)), so row-wise quantities index it directly.
template <typename Layout>
__device__ __forceinline__ auto accumulator_rows_cols(const Layout& layout) {
    using namespace cute;
    const auto acc = as_m16n8(layout);
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

// Two adjacent 16-bit values (at `first`, 4-byte aligned) as floats. A bf16 is the upper half of the
// float with the same value, so two bit operations unpack a pair.
template <typename Element>
__device__ __forceinline__ float2 unpack_pair(const Element* first) {
    uint32_t packed;
    memcpy(&packed, first, sizeof(packed));
    if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
        return make_float2(__uint_as_float(packed << 16), __uint_as_float(packed & 0xffff0000u));
    } else {
        static_assert(std::is_same_v<Element, cutlass::half_t>);
        __half2 pair;
        memcpy(&pair, &packed, sizeof(pair));
        return __half22float2(pair);
    }
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

// Calls f(pair index, coordinate of the pair's first value, of its second value) for every pair of
// adjacent columns held by this thread in an m16n8 accumulator fragment ((2 cols, 2 rows), MMA_M,
// MMA_N). Pair indices run from 0 to size(acc) / 2 - 1 and are compile-time constants once unrolled.
template <typename Acc, typename F>
__device__ __forceinline__ void for_each_pair(const Acc& acc, F&& f) {
    using namespace cute;
    constexpr int kMmaN = decltype(size<2>(acc))::value;
    CUTE_UNROLL
    for (int mi = 0; mi < size<1>(acc); ++mi) {
        CUTE_UNROLL
        for (int ni = 0; ni < kMmaN; ++ni) {
            CUTE_UNROLL
            for (int half = 0; half < 2; ++half) {
                f((mi * kMmaN + ni) * 2 + half, make_coord(make_coord(0, half), mi, ni),
                  make_coord(make_coord(1, half), mi, ni));
            }
        }
    }
}

template <bool kPairAligned>
__device__ __forceinline__ float2 load_pair(const float* address) {
    if constexpr (kPairAligned) {
        return *reinterpret_cast<const float2*>(address);
    } else {
        return make_float2(address[0], address[1]);
    }
}

template <bool kPairAligned>
__device__ __forceinline__ void store_pair(float* address, float2 value) {
    if constexpr (kPairAligned) {
        *reinterpret_cast<float2*>(address) = value;
    } else {
        address[0] = value.x;
        address[1] = value.y;
    }
}

// What add_fragment does with each pair of a thread's accumulator values.
enum class FragmentOp {
    kAtomicAdd,  // several CTAs add into the same addresses
    kAdd,        // this CTA owns the addresses: plain read-add-write (or, with `overwrite`, write)
};

// Adds a fragment of an m16n8 accumulator into fp32 global memory: `dst` and `coord` are the same
// tile partitioned like the accumulator (partition_C), and only rows below `rows` are touched
// (kAllRows: the caller knows that every row of the tile is). Each thread's values come in pairs of
// adjacent columns; with 8-byte aligned pairs they move as float2. kAdd with `overwrite` skips the
// reads and writes the fragment as if adding to zeros: a runtime choice inside the same code, since
// a separate store-only copy shifted ptxas's register allocation of the whole kernel.
template <FragmentOp kOp, bool kPairAligned, bool kAllRows, typename Acc, typename Dst, typename Coord>
__device__ __forceinline__ void add_fragment_impl(const Acc& acc, Dst& dst, const Coord& coord, int rows,
                                                  bool overwrite) {
    using namespace cute;
    auto in_rows = [&](const auto& first) { return kAllRows || get<0>(coord(first)) < rows; };
    if constexpr (kOp == FragmentOp::kAtomicAdd) {
        for_each_pair(acc, [&](int, const auto& first, const auto& second) {
            if (in_rows(first)) atomic_add_pair<kPairAligned>(&dst(first), acc(first), acc(second));
        });
    } else {
        // Every read is issued before the first write. Interleaved, the compiler must assume that a
        // store may alias the next load and waits out one round trip to memory per pair (64 in a
        // row per thread at d128 in the SASS of that version: tens of microseconds per CTA, which
        // short sequences, with few query blocks per CTA, cannot hide).
        float2 old[decltype(size(acc))::value / 2];
        for_each_pair(acc, [&](int i, const auto& first, const auto&) {
            if (in_rows(first)) old[i] = overwrite ? make_float2(0.0f, 0.0f) : load_pair<kPairAligned>(&dst(first));
        });
        for_each_pair(acc, [&](int i, const auto& first, const auto& second) {
            if (in_rows(first)) {
                store_pair<kPairAligned>(&dst(first), make_float2(old[i].x + acc(first), old[i].y + acc(second)));
            }
        });
    }
}

// The common case, a tile whose kTileRows rows all exist with aligned pairs, gets its own copy of the
// code without row tests (in the dQ loop they cost a branch around every atomic); everything else
// (a CTA's first query block at most, or unaligned accumulators) takes the general copy. The choice
// is the same for the whole CTA.
template <FragmentOp kOp, int kTileRows, typename Acc, typename Dst, typename Coord>
__device__ __forceinline__ void add_fragment(const Acc& acc, Dst&& dst, const Coord& coord, int rows,
                                             bool pair_aligned, bool overwrite = false) {
    auto&& dst_pairs = as_m16n8(dst);
    if (pair_aligned && rows >= kTileRows) {
        add_fragment_impl<kOp, true, true>(as_m16n8(acc), dst_pairs, as_m16n8(coord), rows, overwrite);
    } else {
        add_fragment_impl<kOp, false, false>(as_m16n8(acc), dst_pairs, as_m16n8(coord), rows, overwrite);
    }
}

// Writes an fp32 m16n8 accumulator fragment into shared memory (`dst`: the same tile partitioned
// like the accumulator), one 8-byte store per pair of adjacent columns.
template <typename Acc, typename Dst>
__device__ __forceinline__ void store_fragment_smem(const Acc& fragment, Dst&& destination) {
    auto&& acc = as_m16n8(fragment);
    auto&& dst = as_m16n8(destination);
    for_each_pair(acc, [&](int, const auto& first, const auto& second) {
        *reinterpret_cast<float2*>(&dst(first)) = make_float2(acc(first), acc(second));
    });
}

// Hopper's TMA bulk tensor reduction: adds the box at `shared` (laid out as the descriptor says)
// into the tensor the descriptor describes, at coordinates (c0, c1, c2, c3), innermost first;
// elements outside the tensor are skipped. Asynchronous: completion is tracked per issuing thread
// in bulk groups (commit_bulk_group, wait_bulk_reads, wait_bulk_done). Only Hopper traits stage dQ;
// an older target that reached this would lose the adds, so it traps instead. (The fence and the
// waits have nothing to order there and compile to nothing.)
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, const float* shared, int c0, int c1, int c2,
                                                  int c3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const uint32_t shared_address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
    asm volatile(
        "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
            reinterpret_cast<uint64_t>(map)),
        "r"(shared_address), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void commit_bulk_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Makes this thread's earlier generic-proxy writes to shared memory (cp.async included) visible to
// the async proxy: the TMA and wgmma.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Waits until this thread's bulk operations have finished reading shared memory.
__device__ __forceinline__ void wait_bulk_reads() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
// Waits until this thread's bulk operations are complete.
__device__ __forceinline__ void wait_bulk_done() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

// Whether every (column-even) pair of an fp32 (batch, rows, heads, cols) tensor is 8-byte aligned.
__device__ __forceinline__ bool pairs_aligned(const float* base, int64_t batch_stride, int64_t row_stride,
                                              int64_t head_stride) {
    return reinterpret_cast<uintptr_t>(base) % 8 == 0 && batch_stride % 2 == 0 && row_stride % 2 == 0 &&
           head_stride % 2 == 0;
}

}  // namespace bwd
}  // namespace ring_attn
