// The backward ring of one rank, as a step machine with the driver protocol of ring_forward.h
// (exchange(p), transport, compute(p) for p in [0, num_phases())).
//
// K/V travel the ring again, N - 1 hops, and the dK/dV of each block accumulate in fp32 buffers
// that travel with it. Where a block's accumulator starts decides whether its way home can be
// hidden. Started by the owner (its own block first, as the forward does), it comes home only after
// an N-th hop that follows the last step, with no kernel left to hide behind (128 MiB even in the
// input dtype at 32 kv heads, s_k 8k). So the owner adds its own share last instead: a block's
// accumulator starts on the next rank (its step 1) and reaches the owner after N - 1 hops, in the
// last phase, while the owner computes its own block. That step is split by kv heads so that each
// hop has a kernel to hide behind: the first half of the kv heads (phase 0) runs while the first
// K/V block travels, the second (phase N) while the accumulators travel home. Each half writes its
// own fp32 buffer, which finish() adds to what came home in one pass that also rounds to the input
// dtype.
//
// Phases of a ring of N >= 2 (held(p) is the block of step p, see HeldBlocks; acc(p) the block's
// accumulator, in acc_[p % 2]):
//   phase 0:      send held(0), recv held(1)          | own block, kv heads [0, split)
//   phase p, 1 <= p < N:                              | held(p), all heads: p = 1 starts acc(1);
//                 send held(p), recv held(p + 1)      |   p >= 2 computes into partial(p) while
//                   (while p + 1 < N)                 |   acc(p) arrives
//                 send acc(p - 1), recv acc(p) (p >= 2)
//   phase N:      send acc(N - 1) to its owner,       | own block, kv heads [split, h_kv)
//                 recv this rank's accumulator (home)
// Before sending acc(p - 1) the comm stream waits for step p - 1 and adds partial(p - 1) into it.
//   comm stream:    [wait computed[p-1]] add, exchange p  -> transferred[p]
//   compute stream: [wait transferred[p-1]] zero rows, kernels  -> computed[p]
// Two partial buffers alternate (rings of three have one step >= 2 and need one), so step p's
// kernels never wait for step p - 1's add; the writes into a partial buffer follow the add that read
// it through transferred[p-1]. Adds and writes cover only the key rows the step's pieces touch.
// Without GQA a step's first kernel on a set of key rows writes its dK/dV over the buffer instead of
// adding into zeros: only rows that no such kernel writes are zero-filled. delta = rowsum(dout * out)
// is computed once, dq accumulates locally in fp32, and the casts to the input dtype happen once, in
// finish().
//
// Memory, in units of one fp32 dK/dV buffer U (2 x b x s_k x h_kv x d x 4 bytes): two accumulators,
// min(2, N - 2) partials and the own share (U). In rings of four or more the second half of the own
// share lives in the partial buffer of step N - 2 (its add is done by phase N), so there only the
// first half adds to the rest: 3U at N = 2, 4U at N = 3, 4.5U from N = 4 on (the owner-first order
// needed 3U, 4U and 4U). The results, in the input dtype, take the last step's K/V slot.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "ring/cuda_event.h"
#include "ring/held_blocks.h"
#include "ring/ring_plan.h"
#include "ring/ring_transport.h"

namespace ring_attn {

class RingBackward {
  public:
    // dout, q, out (b, s_q, h, d), k and v (b, s_k, h_kv, d), lse fp32 (b, h, s_q): this rank's
    // shards of the global forward, already validated (ring_api.cpp); plan: one step per rank.
    // Construct with q's device current. Allocates on compute_stream.
    RingBackward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const RingPlan& plan, double softmax_scale,
                 c10::cuda::CUDAStream compute_stream, c10::cuda::CUDAStream comm_stream);

    int num_phases() const { return world_size_ + 1; }
    c10::cuda::CUDAStream comm_stream() const { return comm_stream_; }
    // Enqueues the comm stream's waits and step p - 1's add for phase p; returns what phase p transfers.
    const Exchange& exchange(int phase);
    // Call after the transport has enqueued exchange(phase): enqueues phase `phase`'s kernels.
    void compute(int phase);
    // (dq, dk, dv) in the input dtype, ordered on the compute stream.
    std::tuple<at::Tensor, at::Tensor, at::Tensor> finish();

  private:
    struct GradCall {
        at::Tensor dout, q, k, v, lse, delta, dq_accum, dk_accum, dv_accum;
        std::optional<int64_t> key_offset_min, key_offset_max;
        bool dkv_overwrite;  // the first call of its phase on these key rows, without GQA: writes, not adds
    };
    // A step p >= 2 of a ring of N > 2: its partial buffer and acc(p), narrowed to the key rows the
    // step touches (undefined for other phases and for steps without kernels).
    struct StepGrads {
        at::Tensor partial, acc;
    };

    int world_size_;
    double softmax_scale_;
    at::ScalarType dtype_;
    c10::cuda::CUDAStream compute_stream_, comm_stream_;
    at::Tensor delta_, dq_accum_;
    HeldBlocks held_;
    // This rank's share of its own block's dK/dV, fp32 (2 = dk/dv, b, s_k, heads, d): kv heads
    // [0, split_) in own_first_ (all of them in a ring of one), [split_, h_kv) in own_second_.
    int64_t split_;
    at::Tensor own_first_, own_second_;
    // fp32 (2 = dk/dv, b, s_k, h_kv, d): acc(p) is acc_[p % 2], and in phase N the accumulator of
    // this rank's block comes home into acc_[N % 2], free by then (acc(N - 2) left in phase N - 1; a
    // ring of two has no acc(0)).
    std::array<at::Tensor, 2> acc_;
    // The results (2 = dk/dv, b, s_k, h_kv, d) in the input dtype, of a travelling ring: the K/V
    // receive slot of the last step (HeldBlocks::last_slot), free once that step's kernels are done.
    at::Tensor result_;
    std::vector<Exchange> exchanges_;           // per phase
    std::vector<std::vector<GradCall>> calls_;  // per phase
    std::vector<StepGrads> step_grads_;         // per phase
    // Per phase: the rows of its gradient buffer that must be zero before its kernels run, those that
    // no overwriting call writes (all of them under GQA).
    std::vector<std::vector<at::Tensor>> zero_first_;
    CudaEvent inputs_ready_;
    std::array<CudaEvent, 2> transferred_events_;  // by phase parity
    std::array<CudaEvent, 2> computed_events_;     // by phase parity
};

}  // namespace ring_attn
