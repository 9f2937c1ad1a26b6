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
//
// Running state and output: the fp32 running output is never zero-filled (the merge reads a row
// only once its running lse is finite) and never cast as a whole. The plan is known up front, so
// each piece that is the last to touch all of its query rows (no later piece, in this step or a
// later one, touches any of them) runs in emit mode and writes those rows' final output in the
// input dtype itself. Emitting pieces are disjoint; the rows none of them covers (rows that a
// piece shares with later ones, rows no piece touches) are finished in finish() by emit-mode calls
// without keys, which write (lse == -inf ? 0 : the running output) in the input dtype.
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
    // fp32 running state (out uninitialised, lse -inf), the output and the receive buffers on
    // compute_stream, and decides which pieces emit.
    RingForward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RingPlan& plan,
                double softmax_scale, c10::cuda::CUDAStream compute_stream, c10::cuda::CUDAStream comm_stream);

    int num_phases() const { return world_size_; }
    c10::cuda::CUDAStream comm_stream() const { return comm_stream_; }
    // Enqueues the comm stream's waits for phase p and returns what phase p transfers.
    const Exchange& exchange(int phase);
    // Call after the transport has enqueued exchange(phase): enqueues step `phase`'s kernels.
    void compute(int phase);
    // out in q's dtype (the emitting pieces wrote most of it; this finishes the rows they do not
    // cover) and lse fp32 (b, h, s_q), both ordered on the compute stream.
    std::tuple<at::Tensor, at::Tensor> finish();

  private:
    // One flash_fwd_merge call: query rows [q_start, q_start + q_len) of the shard. out_final set:
    // emit mode, the rows' final output goes there.
    struct MergeCall {
        int64_t q_start, q_len;
        at::Tensor q, k, v, out_accum, lse_accum;
        std::optional<int64_t> key_offset_min, key_offset_max;
        std::optional<at::Tensor> out_final;
    };

    MergeCall merge_call(int64_t q_start, int64_t q_len, const at::Tensor& k, const at::Tensor& v,
                         std::optional<int64_t> key_offset_min, std::optional<int64_t> key_offset_max) const;
    void run(MergeCall& call) const;
    // Sets out_final of every call that is the last to touch all of its rows, and plans the finish
    // calls for the rows that no emitting call covers.
    void choose_emitting_calls();

    int world_size_;
    double softmax_scale_;
    c10::cuda::CUDAStream compute_stream_, comm_stream_;
    at::Tensor q_, out_accum_, lse_accum_, out_;
    HeldBlocks held_;
    std::vector<Exchange> exchanges_;           // per phase
    std::vector<std::vector<MergeCall>> calls_;  // per step, in the order they run
    std::vector<MergeCall> finish_calls_;       // emit mode without keys, for rows no call emits
    CudaEvent inputs_ready_;
    std::array<CudaEvent, 2> received_events_;  // by phase parity
    std::array<CudaEvent, 2> computed_events_;  // by phase parity
};

}  // namespace ring_attn
