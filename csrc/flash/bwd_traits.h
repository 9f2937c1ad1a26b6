// Compile-time policy of the backward kernel: tile sizes, how the warps split each of the five
// matrix products, shared-memory layouts and the copy atoms between memories.
//
// Per CTA: one key block (kBlockN rows of K and V, resident in shared memory) against a sequence of
// query blocks (kBlockM rows of Q and dO, streamed through kStages buffers). Five products per query
// block, all with SM80 mma.sync m16n8k16 (fp32 accumulate; on Hopper, d 64 and 128 issue them as
// wgmma instead, bwd_gmma_traits.h):
//   S  = Q  K^T   (kBlockM x kBlockN)          dP = dO V^T  (kBlockM x kBlockN)
//   dV += P^T dO  (kBlockN x kHeadDim)         dK += dS^T Q (kBlockN x kHeadDim)
//   dQ  = dS K    (kBlockM x kHeadDim), added to global memory with fp32 atomics or, when kStageDq,
//                 through shared memory and TMA reductions.
// P and dS go through shared memory because two of the products need them transposed.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace ring_attn {

// The (cols, rows) view of a (rows, cols) shared-memory layout, and the (cols, rows, stage) view of a
// (rows, cols, stage) one: the same bytes, for operands a product needs transposed.
template <typename Layout, int kRows, int kCols>
using Transposed = decltype(cute::composition(
    Layout{}, cute::make_layout(cute::Shape<cute::Int<kCols>, cute::Int<kRows>>{}, cute::GenRowMajor{})));
template <typename Layout, int kRows, int kCols, int kStages>
using TransposedStages = decltype(cute::composition(
    Layout{}, cute::make_layout(cute::Shape<cute::Int<kCols>, cute::Int<kRows>, cute::Int<kStages>>{},
                                cute::Stride<cute::Int<kRows>, cute::_1, cute::Int<kRows * kCols>>{})));

template <typename Element>
struct BwdMmaOp;
template <>
struct BwdMmaOp<cutlass::half_t> {
    using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct BwdMmaOp<cutlass::bfloat16_t> {
    using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

// kWarpsMSdP: warps along the query rows of S/dP (the rest split the keys);
// kWarpsNdKV: warps along the key rows of dK/dV (the rest split the head dim);
// kWarpsMdQ:  warps along the query rows of dQ (the rest split the head dim);
// kStages:    shared-memory buffers for each Q and dO tile (2 = the next block loads during this one).
// kStageDq:   dQ leaves through shared memory and TMA bulk reductions (Hopper) instead of
//             per-thread atomics.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kWarpsMSdP_,
          int kWarpsNdKV_, int kWarpsMdQ_, int kStages_, bool kStageDq_ = false, bool kVInRegs_ = false>
struct BwdTraits {
    using Element = Element_;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kBlockM = kBlockM_;
    static constexpr int kBlockN = kBlockN_;
    static constexpr int kNWarps = kNWarps_;
    static constexpr int kThreads = kNWarps * 32;
    static constexpr int kStages = kStages_;
    static_assert(kStages == 1 || kStages == 2, "Q/dO are single- or double-buffered");
    static_assert(kHeadDim % 32 == 0, "head dims are multiples of 32");

    using MmaAtom = cute::MMA_Atom<typename BwdMmaOp<Element>::type>;

    // Each warp covers 16 columns per repetition of the atom (two n8 atoms), so B operands load with
    // one ldmatrix.x4 per 16x16 slice.
    template <int kWarpsRows>
    using TiledMmaFor =
        cute::TiledMMA<MmaAtom, cute::Layout<cute::Shape<cute::Int<kWarpsRows>, cute::Int<kNWarps / kWarpsRows>, cute::_1>>,
                       cute::Tile<cute::Int<16 * kWarpsRows>, cute::Int<16 * (kNWarps / kWarpsRows)>, cute::_16>>;
    using TiledMmaSdP = TiledMmaFor<kWarpsMSdP_>;
    using TiledMmadKV = TiledMmaFor<kWarpsNdKV_>;
    using TiledMmadQ = TiledMmaFor<kWarpsMdQ_>;
    static_assert(kBlockM % (16 * kWarpsMSdP_) == 0 && kBlockN % (16 * (kNWarps / kWarpsMSdP_)) == 0);
    static_assert(kBlockN % (16 * kWarpsNdKV_) == 0 && kHeadDim % (16 * (kNWarps / kWarpsNdKV_)) == 0);
    static_assert(kBlockM % (16 * kWarpsMdQ_) == 0 && kHeadDim % (16 * (kNWarps / kWarpsMdQ_)) == 0);

    // Q, dO, K, V tiles: rows of kHeadDim elements, swizzled in 8-row atoms so that ldmatrix (plain or
    // transposed) of 8 rows x 16 bytes hits 32 distinct banks. The atom is 64 elements (128 bytes)
    // wide when the head dim allows it, else 32.
    static constexpr int kAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
    static constexpr int kSwizzleBits = kAtomCols == 64 ? 3 : 2;
    using SmemAtomRows = decltype(cute::composition(
        cute::Swizzle<kSwizzleBits, 3, 3>{},
        cute::Layout<cute::Shape<cute::_8, cute::Int<kAtomCols>>, cute::Stride<cute::Int<kAtomCols>, cute::_1>>{}));
    using SmemLayoutQ = decltype(cute::tile_to_shape(
        SmemAtomRows{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
    using SmemLayoutKV =
        decltype(cute::tile_to_shape(SmemAtomRows{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
    // Transposed views (kHeadDim, rows): the same bytes, read with ldmatrix.trans.
    using SmemLayoutQt = TransposedStages<SmemLayoutQ, kBlockM, kHeadDim, kStages>;
    using SmemLayoutKt = Transposed<SmemLayoutKV, kBlockN, kHeadDim>;

    // P and dS tiles (kBlockM, kBlockN), keys contiguous; the transposed view is (kBlockN, kBlockM).
    static constexpr int kAtomColsPdS = kBlockN % 64 == 0 ? 64 : 32;
    using SmemAtomPdS = decltype(cute::composition(
        cute::Swizzle<kAtomColsPdS == 64 ? 3 : 2, 3, 3>{},
        cute::Layout<cute::Shape<cute::_8, cute::Int<kAtomColsPdS>>, cute::Stride<cute::Int<kAtomColsPdS>, cute::_1>>{}));
    using SmemLayoutPdS =
        decltype(cute::tile_to_shape(SmemAtomPdS{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}));
    using SmemLayoutPdSt = Transposed<SmemLayoutPdS, kBlockM, kBlockN>;

    // Shared memory -> registers: ldmatrix for operands stored K-major, ldmatrix.trans for the rest.
    using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
    using SmemCopyAtomTrans = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;

    // Global -> shared: 16-byte cp.async.cg (bypasses L1), kAtomCols / 8 threads per row so one
    // warp-wide request touches whole 128-byte lines.
    static constexpr int kGmemThreadsPerRow = kAtomCols / 8;
    using GmemTiledCopy = decltype(cute::make_tiled_copy(
        cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
        cute::Layout<cute::Shape<cute::Int<kThreads / kGmemThreadsPerRow>, cute::Int<kGmemThreadsPerRow>>,
                     cute::Stride<cute::Int<kGmemThreadsPerRow>, cute::_1>>{},
        cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));
    static_assert(kBlockM % (kThreads / kGmemThreadsPerRow) == 0 && kBlockN % (kThreads / kGmemThreadsPerRow) == 0);
    // Shared -> global for the dK/dV tiles written in the input dtype: 16-byte stores, the same
    // thread arrangement as the loads.
    using GmemTiledStore = decltype(cute::make_tiled_copy(
        cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{},
        cute::Layout<cute::Shape<cute::Int<kThreads / kGmemThreadsPerRow>, cute::Int<kGmemThreadsPerRow>>,
                     cute::Stride<cute::Int<kGmemThreadsPerRow>, cute::_1>>{},
        cute::Layout<cute::Shape<cute::_1, cute::_8>>{}));

    // Shared memory, in elements: K, V, then Q and dO (kStages each), then P and dS.
    static constexpr int kSizeKV = kBlockN * kHeadDim;
    static constexpr int kSizeQ = kBlockM * kHeadDim * kStages;
    static constexpr int kSizePdS = kBlockM * kBlockN;
    static constexpr int kSmemElements = 2 * kSizeKV + 2 * kSizeQ + 2 * kSizePdS;
    static constexpr int kSmemOperandBytes = kSmemElements * int(sizeof(Element));

    // dQ staging tile (kStageDq): fp32 (kBlockM, kHeadDim) as kHeadDim / 8 column slices of
    // (kBlockM, 8), each dense and unswizzled: the shared-memory image of one TMA box. A warp's
    // 8-byte accumulator store covers 8 rows x 8 columns, i.e. 256 contiguous bytes of one slice, so
    // each half-warp writes 128 contiguous bytes: two wavefronts, no bank conflict. (With 32-column
    // slices and the 128-byte swizzle, rows r and r ^ 1 of a half-warp hit the same banks: twice the
    // wavefronts, about 34M bank conflicts per d128 s4k call in Nsight Compute.)
    static constexpr bool kStageDq = kStageDq_;
    static_assert(!kStageDq || kHeadDim % 8 == 0);
    using SmemLayoutDq = cute::Layout<cute::Shape<cute::Int<kBlockM>, cute::Shape<cute::_8, cute::Int<kHeadDim / 8>>>,
                                      cute::Stride<cute::_8, cute::Stride<cute::_1, cute::Int<kBlockM * 8>>>>;
    static constexpr int kSmemDqBytes = kStageDq ? kBlockM * kHeadDim * 4 : 0;
    static_assert(kSmemOperandBytes % 128 == 0, "TMA boxes need 128-byte aligned shared memory");
    static constexpr int kSmemBytes = kSmemOperandBytes + kSmemDqBytes;

    // kVInRegs: each warp loads its slice of V (the B operand of dP = dO V^T) into registers once
    // and keeps it for every query block, instead of reloading it from shared memory per block.
    static constexpr bool kVInRegs = kVInRegs_;
};

}  // namespace ring_attn
