// The backward ring of one rank, as a step machine with the driver protocol of ring_forward.h
// (exchange(p), transport, compute(p) for p in [0, num_phases())).
//
// K/V travel the ring again, N - 1 hops. dK/dV of each block accumulate in fp32 buffers that
// travel with it, N hops, so each comes home to its owner after the last step. A block's dK/dV
// cannot arrive before the previous rank has finished its step on that block, so step p >= 1
// computes its own dK/dV into an fp32 `partial` while the block's accumulated dK/dV, acc(p),
// is in flight, and the comm stream adds partial into acc(p) right before sending it on (step 0
// starts the block's accumulator itself). Each phase p >= 1 is one NCCL group, issued once step
// p - 1 is done:
//   acc(p - 1) += partial(p - 1)          (on the comm stream; acc(p - 1) arrived in phase p - 1)
//   send acc(p - 1) -> next rank          (the block of step p - 1, complete up to this rank)
//   recv acc(p) <- previous rank          (the block of step p; at p = N this rank's own dK/dV)
//   send held(p), recv held(p + 1)        (K/V, while p + 1 < N)
// so the K/V of step p + 1 and the dK/dV of step p move, and step p - 1's add runs, while step p's
// kernels run; only the last hop home (phase N) has no kernel left to hide behind. That hop carries
// the finished dK/dV already rounded to the input dtype (the same rounding the owner would do on
// arrival, so the result is identical), half the bytes of fp32: on two H200s with 32 kv heads at
// s_k 8k the exposed hop was 256 MiB. The last step's add and that rounding are one pass over the
// buffers. Phase 0 sends the local block.
//   comm stream:    [wait computed[p-1]] add, exchange p  -> transferred[p]
//   compute stream: [wait transferred[p-1]] zero rows, bwd kernels of step p  -> computed[p]
// Two partial buffers alternate (a ring of two has one step >= 1 and one buffer), so step p's
// kernels never wait for step p - 1's add; the writes into a partial buffer follow the add that read
// it through transferred[p-1]. Adds and writes cover only the key rows the step's pieces touch.
// Without GQA a step's first kernel on a set of key rows writes its dK/dV over the buffer (acc(0) or
// a partial) instead of adding into zeros: only rows that no such kernel writes are zero-filled,
// which at 32 kv heads and s_k 8k saves up to two 256 MiB fills, and reads, per backward at N = 2.
// delta = rowsum(dout * out) is computed once, dq accumulates locally in fp32, and the casts to the
// input dtype happen once, in finish() (dK/dV: before the last hop, on the rank that sends it).
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
    // Call after the transport has enqueued exchange(phase): enqueues step `phase`'s kernels.
    void compute(int phase);
    // (dq, dk, dv) in the input dtype, ordered on the compute stream.
    std::tuple<at::Tensor, at::Tensor, at::Tensor> finish();

  private:
    struct GradCall {
        at::Tensor dout, q, k, v, lse, delta, dq_accum, dk_accum, dv_accum;
        std::optional<int64_t> key_offset_min, key_offset_max;
        bool dkv_overwrite;  // the first call of its step on these key rows, without GQA: writes, not adds
    };
    // The key rows a step >= 1 touches, from first_row on: its partial buffer and its block's
    // accumulator, narrowed to them (undefined for step 0 and for steps without kernels).
    struct StepGrads {
        at::Tensor partial, acc;
        int64_t first_row = 0;
    };
    // Phase N, on the comm stream: home_send_ = acc(N - 1) + the last step's partial, in the input
    // dtype.
    void complete_home_send(const StepGrads& last);

    int world_size_;
    double softmax_scale_;
    at::ScalarType dtype_;
    c10::cuda::CUDAStream compute_stream_, comm_stream_;
    at::Tensor delta_, dq_accum_;
    HeldBlocks held_;
    std::array<at::Tensor, 2> acc_;  // fp32 (2 = dk/dv, b, s_k, h_kv, d); acc(p) is acc_[p % 2]
    // The last hop (rings of two or more): home_send_ holds acc(N - 1) in the input dtype, in the
    // bytes of acc(N - 2) (which left in phase N - 1); home_ receives this rank's dK/dV, which
    // finish() returns, in the K/V receive slot of the last step (HeldBlocks::last_slot).
    at::Tensor home_send_, home_;
    std::vector<Exchange> exchanges_;           // per phase
    std::vector<std::vector<GradCall>> calls_;  // per step
    std::vector<StepGrads> step_grads_;         // per step
    // Per step: the rows of its gradient buffer that must be zero before its kernels run, those that
    // no overwriting call writes (all of them under GQA).
    std::vector<std::vector<at::Tensor>> zero_first_;
    CudaEvent inputs_ready_;
    std::array<CudaEvent, 2> transferred_events_;  // by phase parity
    std::array<CudaEvent, 2> computed_events_;     // by phase parity
};

}  // namespace ring_attn
