// The forward ring of one rank, as a step machine that a driver (ring_driver.h) runs: for each
// phase p in [0, num_phases()), exchange(p), then the transport carries the returned Exchange out
// on comm_stream(), then compute(p). The NCCL driver runs one machine for this process's rank; the
// loopback driver interleaves the machines of all virtual ranks phase by phase.
//
// Phase p computes on the block held at step p (held(0) is the local K/V, held(p) for p >= 1
// arrived from the previous rank) and, meanwhile, sends held(p) to the next rank and receives
// held(p + 1) into a second buffer; the last phase sends nothing. Streams and events:
//   comm stream:    [wait compute p-1]  send held(p) / recv held(p+1)  -> received[p]
//   compute stream: [wait received[p-1]]  fwd_merge of step p's pieces  -> computed[p]
// The receive into a buffer waits for the compute that last read it (held(p-1), same buffer as
// held(p+1)); compute waits only for the block it reads. All buffers are allocated before the
// loop; every comm-stream use of a tensor precedes an event the compute stream waits on before
// finish(), so tensors allocated on the compute stream are safe for the caching allocator to reuse
// in that stream's order.
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

class RingForward {
  public:
    // q (b, s_q, h, d), k and v (b, s_k, h_kv, d): this rank's shards, already validated
    // (ring_api.cpp); plan: one step per rank. Construct with q's device current. Allocates the
    // fp32 running state (out 0, lse -inf) and the receive buffers on compute_stream.
    RingForward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RingPlan& plan,
                double softmax_scale, c10::cuda::CUDAStream compute_stream, c10::cuda::CUDAStream comm_stream);

    int num_phases() const { return world_size_; }
    c10::cuda::CUDAStream comm_stream() const { return comm_stream_; }
    // Enqueues the comm stream's waits for phase p and returns what phase p transfers.
    const Exchange& exchange(int phase);
    // Call after the transport has enqueued exchange(phase): enqueues step `phase`'s kernels.
    void compute(int phase);
    // out in q's dtype (one cast of the fp32 running output) and lse fp32 (b, h, s_q), both
    // ordered on the compute stream.
    std::tuple<at::Tensor, at::Tensor> finish();

  private:
    struct MergeCall {
        at::Tensor q, k, v, out_accum, lse_accum;
        std::optional<int64_t> key_offset_min, key_offset_max;
    };

    int world_size_;
    double softmax_scale_;
    at::ScalarType dtype_;
    c10::cuda::CUDAStream compute_stream_, comm_stream_;
    at::Tensor out_accum_, lse_accum_;
    HeldBlocks held_;
    std::vector<Exchange> exchanges_;           // per phase
    std::vector<std::vector<MergeCall>> calls_;  // per step
    CudaEvent inputs_ready_;
    std::array<CudaEvent, 2> received_events_;  // by phase parity
    std::array<CudaEvent, 2> computed_events_;  // by phase parity
};

}  // namespace ring_attn
