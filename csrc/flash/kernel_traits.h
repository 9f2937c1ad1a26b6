// Compile-time policy shared by the FlashAttention-2-style kernels (mma.sync, SM80 instructions that
// also run on SM90): the element type, the MMA, shared-memory layouts and copy atoms for one tile
// shape. The forward and backward kernels each derive their own traits from these building blocks.
//
// Conventions used by every kernel in this directory:
//   - tensors are (rows, head_dim) with a contiguous head dim; 16-byte (8-element) global accesses;
//   - one warp computes 16-row slabs of a tile, so softmax row reductions stay inside a warp (inside
//     a quad of 4 lanes, in fact: an m16n8 accumulator row lives in 4 consecutive lanes);
//   - shared-memory tiles are built from 8-row swizzled atoms 64 (or 32) elements wide, which makes
//     both the 16-byte cp.async stores and the ldmatrix loads free of bank conflicts.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace ring_attn {
namespace flash {

using namespace cute;

// The tensor-core instruction for 16x8x16 products with fp32 accumulation.
template <typename Element>
struct MmaOpFor;
template <>
struct MmaOpFor<cutlass::half_t> {
    using type = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct MmaOpFor<cutlass::bfloat16_t> {
    using type = SM80_16x8x16_F32BF16BF16F32_TN;
};

// Building blocks for tiles of `kHeadDim`-wide rows of `Element` processed by `kNWarps` warps.
template <typename Element_, int kHeadDim_, int kNWarps_>
struct AttentionTraitsBase {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kNWarps = kNWarps_;
    static constexpr int kNThreads = kNWarps * 32;
    static_assert(kHeadDim % 32 == 0, "head dims are multiples of 32");

    // Width of one swizzle atom in elements: 64 (128-byte rows, 3 swizzle bits) when the head dim
    // allows it, otherwise 32 (64-byte rows, 2 bits). Each 16-byte chunk of a row is XOR-ed with the
    // row index inside the 8-row atom, so 8 consecutive rows read at the same column hit distinct banks.
    static constexpr int kAtomWidth = kHeadDim % 64 == 0 ? 64 : 32;
    static constexpr int kSwizzleBits = kAtomWidth == 64 ? 3 : 2;
    using SmemAtom = decltype(composition(
        Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kAtomWidth>>, Stride<Int<kAtomWidth>, _1>>{}));

    // (kRows, kHeadDim) tile in shared memory.
    template <int kRows>
    using SmemTile = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kRows>, Int<kHeadDim>>{}));

    // The transposed view (kHeadDim, kRows) of a SmemTile: V^T as the B operand of P.V without
    // storing it transposed (read with ldmatrix.trans).
    template <int kRows>
    using SmemTileTransposed = decltype(composition(
        SmemTile<kRows>{}, make_layout(Shape<Int<kHeadDim>, Int<kRows>>{}, GenRowMajor{})));

    // Warps split the M (row) dimension only. The N extent of 16 makes every warp run two n8 atoms
    // per step, so one ldmatrix.x4 feeds a 16x16 B tile.
    using TiledMma = TiledMMA<MMA_Atom<typename MmaOpFor<Element>::type>, Layout<Shape<Int<kNWarps>, _1, _1>>,
                              Tile<Int<16 * kNWarps>, _16, _16>>;

    // Shared memory -> registers.
    using SmemLoadAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;            // K-contiguous operands
    using SmemLoadAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // MN-contiguous operands
    // Registers (accumulator layout, pairs of columns) -> shared memory.
    using SmemStoreAtom = Copy_Atom<UniversalCopy<uint32_t>, Element>;

    // Global <-> shared: 16 bytes per thread per access; a row of one swizzle atom is covered by
    // kAtomWidth / 8 threads, so one warp instruction writes whole 128- (or 64-) byte atom rows.
    static constexpr int kElemsPerAccess = 16 / sizeof(Element);
    static constexpr int kThreadsPerRow = kAtomWidth / kElemsPerAccess;
    static_assert(kNThreads % kThreadsPerRow == 0, "thread layout must tile the CTA");
    using GmemThreadLayout = Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
                                    Stride<Int<kThreadsPerRow>, _1>>;
    using GmemValueLayout = Layout<Shape<_1, Int<kElemsPerAccess>>>;
    // cp.async.cg (bypasses L1) with zero fill, so rows past the sequence end read as zeros.
    using GmemTiledLoad = decltype(make_tiled_copy(
        Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
        GmemValueLayout{}));
    using GmemTiledStore = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{},
                                                    GmemThreadLayout{}, GmemValueLayout{}));
};

}  // namespace flash
}  // namespace ring_attn
