#include "ring/ring_forward.h"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "flash_api.h"

namespace ring_attn {

RingForward::RingForward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RingPlan& plan,
                         double softmax_scale, c10::cuda::CUDAStream compute_stream,
                         c10::cuda::CUDAStream comm_stream)
    : world_size_(static_cast<int>(plan.size())),
      softmax_scale_(softmax_scale),
      compute_stream_(compute_stream),
      comm_stream_(comm_stream),
      q_(q),
      held_(k, v, world_size_, compute_stream) {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    const int64_t batch = q.size(0), seqlen_q = q.size(1), heads = q.size(2), head_dim = q.size(3);
    const auto fp32 = q.options().dtype(at::kFloat);
    // No zero fill: the merge never reads a running output row before its lse is finite.
    out_accum_ = at::empty({batch, seqlen_q, heads, head_dim}, fp32);
    lse_accum_ = at::full({batch, heads, seqlen_q}, -std::numeric_limits<float>::infinity(), fp32);
    out_ = at::empty({batch, seqlen_q, heads, head_dim}, q.options());

    // Phase p sends held(p) and receives held(p + 1).
    exchanges_.resize(world_size_);
    for (int phase = 0; phase < world_size_; ++phase) held_.add_transfer(phase, exchanges_[phase]);
    calls_.resize(world_size_);
    for (int step = 0; step < world_size_; ++step) {
        for (const PlanPiece& piece : plan[step]) {
            if (piece.q_len == 0 || piece.k_len == 0) continue;
            calls_[step].push_back(merge_call(piece.q_start, piece.q_len,
                                              held_.k(step).narrow(1, piece.k_start, piece.k_len),
                                              held_.v(step).narrow(1, piece.k_start, piece.k_len),
                                              piece.key_offset_min, piece.key_offset_max));
        }
    }
    choose_emitting_calls();
    if (held_.travels()) {
        // The comm stream starts after everything the caller enqueued (inputs, the contiguous
        // copies, and earlier users of the memory the receive buffers now occupy).
        inputs_ready_.record(compute_stream_);
        inputs_ready_.block(comm_stream_);
    }
}

RingForward::MergeCall RingForward::merge_call(int64_t q_start, int64_t q_len, const at::Tensor& k,
                                               const at::Tensor& v, std::optional<int64_t> key_offset_min,
                                               std::optional<int64_t> key_offset_max) const {
    return MergeCall{q_start,
                     q_len,
                     q_.narrow(1, q_start, q_len),
                     k,
                     v,
                     out_accum_.narrow(1, q_start, q_len),
                     lse_accum_.narrow(2, q_start, q_len),
                     key_offset_min,
                     key_offset_max,
                     std::nullopt};
}

void RingForward::choose_emitting_calls() {
    // Walk the calls from the last one run to the first, collecting the rows touched so far (that
    // is, touched later in the ring). A call whose rows none of them touch gives those rows their
    // last contribution: it emits. Emitting calls are therefore disjoint.
    struct RowRange {
        int64_t start, end;
    };
    std::vector<RowRange> touched_later, emitted;
    for (int step = world_size_ - 1; step >= 0; --step) {
        for (auto call = calls_[step].rbegin(); call != calls_[step].rend(); ++call) {
            const RowRange rows{call->q_start, call->q_start + call->q_len};
            const bool last = std::none_of(touched_later.begin(), touched_later.end(), [&](const RowRange& other) {
                return other.start < rows.end && rows.start < other.end;
            });
            if (last) {
                call->out_final = out_.narrow(1, rows.start, rows.end - rows.start);
                emitted.push_back(rows);
            }
            touched_later.push_back(rows);
        }
    }

    // The gaps between emitted ranges: finished from the running state by calls without keys.
    std::sort(emitted.begin(), emitted.end(), [](const RowRange& a, const RowRange& b) { return a.start < b.start; });
    emitted.push_back(RowRange{q_.size(1), q_.size(1)});  // sentinel: the gap up to the last row
    const at::Tensor no_keys = held_.k(0).narrow(1, 0, 0);
    int64_t next = 0;  // first row not yet covered
    for (const RowRange& rows : emitted) {
        if (rows.start > next) {
            MergeCall call = merge_call(next, rows.start - next, no_keys, no_keys, std::nullopt, std::nullopt);
            call.out_final = out_.narrow(1, next, rows.start - next);
            finish_calls_.push_back(std::move(call));
        }
        next = std::max(next, rows.end);
    }
}

void RingForward::run(MergeCall& call) const {
    flash_fwd_merge(call.q, call.k, call.v, call.out_accum, call.lse_accum, softmax_scale_, call.key_offset_min,
                    call.key_offset_max, call.out_final);
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
    for (MergeCall& call : calls_[phase]) run(call);
    computed_events_[phase % 2].record(compute_stream_);
}

std::tuple<at::Tensor, at::Tensor> RingForward::finish() {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    for (MergeCall& call : finish_calls_) run(call);
    return {out_, lse_accum_};
}

}  // namespace ring_attn
