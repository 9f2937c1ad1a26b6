// Hopper warpgroup MMA (wgmma) policy of the backward kernel, for traits whose tiles allow it (head
// dims 64 and 128: 128-byte rows, kBlockN = 128, 8 warps = 2 warpgroups).
//
// The five products are the ones bwd_traits.h lists, issued as wgmma with both operands read from
// shared memory by descriptor. Against mma.sync fed by ldmatrix, each warpgroup reads an operand
// tile once for its four warps instead of once per warp, which halves the shared-memory traffic of
// the products (the mma.sync kernel's limit: its warps stall on shared memory most of all), and no
// instruction issues the loads.
//
// The shared-memory bytes are those of BwdTraits: its 8 x 64 atoms swizzled on 16-byte chunks are
// the 128-byte swizzle that wgmma reads (Swizzle<3,3,3> on 16-bit element offsets is Swizzle<3,4,3>
// on byte offsets, given a 1024-byte aligned base), so both kernels share the buffers and the
// global -> shared copies. Only the layout types differ: cute builds wgmma descriptors from the
// pointer-swizzled form used here.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "bwd_traits.h"

namespace ring_attn {

// Whether the Hopper build of a backward config runs the wgmma body: tiles of 128-byte rows, staged
// dQ, double-buffered Q and dO, V in shared memory.
// wgmma exists in sm_90a code only (an sm_90 build keeps the mma.sync body).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
inline constexpr bool kArchHasGmma = true;
#else
inline constexpr bool kArchHasGmma = false;
#endif
template <typename Traits>
constexpr bool kBwdUsesGmma = kArchHasGmma && Traits::kStageDq && Traits::kHeadDim % 64 == 0 &&
                              Traits::kBlockN == 128 && Traits::kBlockM % 64 == 0 && Traits::kStages == 2 &&
                              !Traits::kVInRegs && Traits::kNWarps == 8;

template <typename Traits>
struct BwdGmmaTraits {
    using Element = typename Traits::Element;
    static constexpr int kHeadDim = Traits::kHeadDim;
    static constexpr int kBlockM = Traits::kBlockM;
    static constexpr int kBlockN = Traits::kBlockN;
    static constexpr int kStages = Traits::kStages;
    static_assert(Traits::kNWarps == 8, "two warpgroups");
    static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0 && kBlockM % 64 == 0, "128-byte swizzled rows");
    // Every buffer (and stage) starts on a 1024-byte boundary, where the swizzle pattern restarts.
    static_assert(Traits::kSizeKV * sizeof(Element) % 1024 == 0 && Traits::kSizePdS * sizeof(Element) % 1024 == 0 &&
                  kBlockM * kHeadDim * sizeof(Element) % 1024 == 0);

    // K-major 128-byte swizzle atom (8 rows of 64 elements): Q, dO, K, V, P and dS tiles.
    using Atom = cute::SM90::GMMA::Layout_K_SW128_Atom<Element>;
    using SmemLayoutQ = decltype(cute::tile_to_shape(
        Atom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
    using SmemLayoutKV = decltype(cute::tile_to_shape(Atom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
    using SmemLayoutPdS = decltype(cute::tile_to_shape(Atom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
    // Transposed views of the same bytes: the MN-major operands of dV, dK and dQ.
    using SmemLayoutQt = TransposedStages<SmemLayoutQ, kBlockM, kHeadDim, kStages>;
    using SmemLayoutKt = Transposed<SmemLayoutKV, kBlockN, kHeadDim>;
    using SmemLayoutPdSt = Transposed<SmemLayoutPdS, kBlockM, kBlockN>;

    // A warpgroup computes 64 rows per instruction. Each product's tile is split between the two
    // warpgroups along its rows when it has 128 of them, else along its columns.
    template <int kRows, int kCols, cute::SM90::GMMA::Major kMajorA, cute::SM90::GMMA::Major kMajorB>
    static constexpr auto tiled_mma() {
        using namespace cute;
        constexpr int kGroupsM = kRows >= 128 ? 2 : 1;
        constexpr int kGroupsN = 2 / kGroupsM;
        using Op = decltype(SM90::GMMA::ss_op_selector<Element, Element, float,
                                                       Shape<_64, Int<kCols / kGroupsN>, _16>, kMajorA, kMajorB>());
        static_assert(kRows == 64 || kRows == 128, "one or two warpgroups of rows");
        return make_tiled_mma(Op{}, Layout<Shape<Int<kGroupsM>, Int<kGroupsN>, _1>>{});
    }
    static constexpr auto kK = cute::SM90::GMMA::Major::K;
    static constexpr auto kMN = cute::SM90::GMMA::Major::MN;
    // S = Q K^T and dP = dO V^T: (kBlockM, kBlockN), both operands K-major (the head dim).
    using TiledMmaSdP = decltype(tiled_mma<kBlockM, kBlockN, kK, kK>());
    // dV = P^T dO and dK = dS^T Q: (kBlockN, kHeadDim) over the queries, both operands MN-major.
    using TiledMmadKV = decltype(tiled_mma<kBlockN, kHeadDim, kMN, kMN>());
    // dQ = dS K: (kBlockM, kHeadDim) over the keys; dS K-major, K^T MN-major.
    using TiledMmadQ = decltype(tiled_mma<kBlockM, kHeadDim, kK, kMN>());
};

}  // namespace ring_attn
