#include "ring/ring_forward.h"

#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "flash_api.h"

namespace ring_attn {

RingForward::RingForward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RingPlan& plan,
                         double softmax_scale, c10::cuda::CUDAStream compute_stream,
                         c10::cuda::CUDAStream comm_stream)
    : world_size_(static_cast<int>(plan.size())),
      softmax_scale_(softmax_scale),
      dtype_(q.scalar_type()),
      compute_stream_(compute_stream),
      comm_stream_(comm_stream),
      held_(k, v, world_size_, compute_stream) {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    const int64_t batch = q.size(0), seqlen_q = q.size(1), heads = q.size(2), head_dim = q.size(3);
    const auto fp32 = q.options().dtype(at::kFloat);
    out_accum_ = at::zeros({batch, seqlen_q, heads, head_dim}, fp32);
    lse_accum_ = at::full({batch, heads, seqlen_q}, -std::numeric_limits<float>::infinity(), fp32);

    // Phase p sends held(p) and receives held(p + 1).
    exchanges_.resize(world_size_);
    for (int phase = 0; phase < world_size_; ++phase) held_.add_transfer(phase, exchanges_[phase]);
    calls_.resize(world_size_);
    for (int step = 0; step < world_size_; ++step) {
        for (const PlanPiece& piece : plan[step]) {
            if (piece.q_len == 0 || piece.k_len == 0) continue;
            calls_[step].push_back(MergeCall{q.narrow(1, piece.q_start, piece.q_len),
                                             held_.k(step).narrow(1, piece.k_start, piece.k_len),
                                             held_.v(step).narrow(1, piece.k_start, piece.k_len),
                                             out_accum_.narrow(1, piece.q_start, piece.q_len),
                                             lse_accum_.narrow(2, piece.q_start, piece.q_len),
                                             piece.key_offset_min, piece.key_offset_max});
        }
    }
    if (held_.travels()) {
        // The comm stream starts after everything the caller enqueued (inputs, the contiguous
        // copies, and earlier users of the memory the receive buffers now occupy).
        inputs_ready_.record(compute_stream_);
        inputs_ready_.block(comm_stream_);
    }
}

const Exchange& RingForward::exchange(int phase) {
    // Phase p receives into the buffer of held(p - 1): wait until step p - 1 has read it.
    if (phase >= 2 && !exchanges_[phase].empty()) computed_events_[(phase - 1) % 2].block(comm_stream_);
    return exchanges_[phase];
}

void RingForward::compute(int phase) {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    if (!exchanges_[phase].empty()) received_events_[phase % 2].record(comm_stream_);
    if (phase >= 1) received_events_[(phase - 1) % 2].block(compute_stream_);
    for (MergeCall& call : calls_[phase]) {
        flash_fwd_merge(call.q, call.k, call.v, call.out_accum, call.lse_accum, softmax_scale_, call.key_offset_min,
                        call.key_offset_max);
    }
    computed_events_[phase % 2].record(compute_stream_);
}

std::tuple<at::Tensor, at::Tensor> RingForward::finish() {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    return {out_accum_.to(dtype_), lse_accum_};
}

}  // namespace ring_attn
