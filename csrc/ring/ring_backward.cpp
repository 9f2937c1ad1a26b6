#include "ring/ring_backward.h"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <utility>

#include "flash_api.h"

namespace ring_attn {

RingBackward::RingBackward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& out, const at::Tensor& lse, const RingPlan& plan, double softmax_scale,
                           c10::cuda::CUDAStream compute_stream, c10::cuda::CUDAStream comm_stream)
    : world_size_(static_cast<int>(plan.size())),
      softmax_scale_(softmax_scale),
      dtype_(q.scalar_type()),
      compute_stream_(compute_stream),
      comm_stream_(comm_stream),
      held_(k, v, world_size_, compute_stream) {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    const int64_t batch = q.size(0), seqlen_q = q.size(1), heads = q.size(2), head_dim = q.size(3);
    const int64_t seqlen_k = k.size(1), heads_kv = k.size(2);
    const auto fp32 = q.options().dtype(at::kFloat);
    dq_accum_ = at::empty({batch, seqlen_q, heads, head_dim}, fp32);
    delta_ = flash_bwd_delta(dout, out, dq_accum_);  // also zero-fills dq_accum_

    const bool travels = held_.travels();
    // acc_[0] holds acc(0), which step 0 starts; acc_[1] only ever receives.
    const at::Tensor dkv = at::empty({travels ? 2 : 1, 2, batch, seqlen_k, heads_kv, head_dim}, fp32);
    acc_[0] = dkv[0];
    // Step p >= 1 adds its dK/dV of held(p) into a partial, slot (p - 1) % 2, because acc(p) arrives
    // while the step runs. Two slots alternate, so one can be filled while the previous one is still
    // being added on the comm stream; a ring of two has a single such step and needs one slot (at
    // s_k 8k with 32 kv heads that saves 256 MiB).
    at::Tensor partials;  // (slots, 2 = dk/dv, b, s_k, h_kv, d)
    if (travels) {
        acc_[1] = dkv[1];
        const int64_t slots = std::min(2, world_size_ - 1);
        partials = at::empty({slots, 2, batch, seqlen_k, heads_kv, head_dim}, fp32);
        // The send buffer of the last hop is the first half of acc(N - 2)'s bytes, viewed as the
        // input dtype (16-bit elements: half the bytes of the fp32 buffer). acc(N - 2) left in phase
        // N - 1, and phase N runs after it on the comm stream, so the buffer is free by then.
        const at::Tensor spent = acc_[world_size_ % 2];
        home_send_ = spent.view({-1}).view(dtype_).narrow(0, 0, spent.numel()).view(spent.sizes());
        // This rank's dK/dV arrive in phase N, after the last step's kernels (which the comm stream
        // waits for before that exchange) have read the K/V of the last slot: its bytes take them, and
        // the backward allocates no buffer for its results (128 MiB at 32 kv heads, s_k 8k).
        home_ = held_.last_slot();
    }
    exchanges_.resize(world_size_ + 1);
    for (int phase = 0; travels && phase <= world_size_; ++phase) {
        Exchange& exchange = exchanges_[phase];
        held_.add_transfer(phase, exchange);
        if (phase == world_size_) {
            exchange.sends.push_back(home_send_);
            exchange.recvs.push_back(home_);
        } else if (phase >= 1) {
            exchange.sends.push_back(acc_[(phase - 1) % 2]);
            exchange.recvs.push_back(acc_[phase % 2]);
        }
    }
    calls_.resize(world_size_);
    step_grads_.resize(world_size_);
    zero_first_.resize(world_size_);
    // Without GQA each dK/dV tile of a call has one owner CTA, so a call whose key rows no earlier
    // call of its step touched can write its gradients over the buffer instead of adding them to
    // zeros: no zero-fill, and the kernels read nothing back. Under GQA every call adds.
    const bool calls_can_overwrite = heads == heads_kv;
    for (int step = 0; step < world_size_; ++step) {
        const at::Tensor grads = step == 0 ? acc_[0] : partials[(step - 1) % 2];
        int64_t first_row = seqlen_k, end_row = 0;
        std::vector<std::pair<int64_t, int64_t>> touched, overwritten;  // key-row ranges [begin, end)
        for (const PlanPiece& piece : plan[step]) {
            if (piece.q_len == 0 || piece.k_len == 0) continue;
            const std::pair<int64_t, int64_t> rows{piece.k_start, piece.k_start + piece.k_len};
            const bool overwrite = calls_can_overwrite && std::none_of(touched.begin(), touched.end(), [&](auto r) {
                                       return r.first < rows.second && rows.first < r.second;
                                   });
            touched.push_back(rows);
            if (overwrite) overwritten.push_back(rows);
            auto rows_q = [&](const at::Tensor& t) { return t.narrow(1, piece.q_start, piece.q_len); };
            auto rows_k = [&](const at::Tensor& t) { return t.narrow(1, piece.k_start, piece.k_len); };
            calls_[step].push_back(GradCall{rows_q(dout), rows_q(q), rows_k(held_.k(step)), rows_k(held_.v(step)),
                                            lse.narrow(2, piece.q_start, piece.q_len),
                                            delta_.narrow(2, piece.q_start, piece.q_len), rows_q(dq_accum_),
                                            rows_k(grads[0]), rows_k(grads[1]), piece.key_offset_min,
                                            piece.key_offset_max, overwrite});
            first_row = std::min(first_row, rows.first);
            end_row = std::max(end_row, rows.second);
        }
        if (step >= 1 && !calls_[step].empty()) {
            // (2 = dk/dv, b, rows, h_kv, d) views: the rows are dimension 2.
            step_grads_[step] = StepGrads{grads.narrow(2, first_row, end_row - first_row),
                                          acc_[step % 2].narrow(2, first_row, end_row - first_row), first_row};
        }
        // What the step's buffer must hold when its kernels are done: all of acc(0) (it travels, or is
        // the result, whole), the touched rows of a partial. The rows of it that no overwriting call
        // writes start from zero.
        if (step == 0) {
            first_row = 0, end_row = seqlen_k;
        }
        std::sort(overwritten.begin(), overwritten.end());
        int64_t row = first_row;
        for (const auto& [begin, end] : overwritten) {
            if (begin > row) zero_first_[step].push_back(grads.narrow(2, row, begin - row));
            row = std::max(row, end);
        }
        if (row < end_row) zero_first_[step].push_back(grads.narrow(2, row, end_row - row));
    }
    if (travels) {
        // The comm stream starts after everything the caller enqueued and the set-up above.
        inputs_ready_.record(compute_stream_);
        inputs_ready_.block(comm_stream_);
    }
}

const Exchange& RingBackward::exchange(int phase) {
    if (phase >= 1 && !exchanges_[phase].empty()) {
        // Step p - 1 is done: its partial is complete, and its K/V buffer may be overwritten.
        computed_events_[(phase - 1) % 2].block(comm_stream_);
        const StepGrads& previous = step_grads_[phase - 1];
        c10::cuda::CUDAStreamGuard guard(comm_stream_);
        // acc(p - 1) arrived earlier on this stream; complete it before it travels on.
        if (phase < world_size_) {
            if (previous.partial.defined()) previous.acc.add_(previous.partial);
        } else {
            complete_home_send(previous);
        }
    }
    return exchanges_[phase];
}

void RingBackward::complete_home_send(const StepGrads& last) {
    const at::Tensor acc = acc_[(world_size_ - 1) % 2];
    if (!last.partial.defined()) {
        home_send_.copy_(acc);
        return;
    }
    // One pass: the sum is rounded to fp32 and then to the input dtype as the stored fp32 sum would
    // be, without writing it back into acc and reading it again. Rows the step did not touch are
    // only cast.
    const int64_t rows = last.partial.size(2);
    at::Tensor touched = home_send_.narrow(2, last.first_row, rows);
    at::add_out(touched, last.acc, last.partial);
    const int64_t end_row = last.first_row + rows, seqlen_k = acc.size(2);
    if (last.first_row > 0) home_send_.narrow(2, 0, last.first_row).copy_(acc.narrow(2, 0, last.first_row));
    if (end_row < seqlen_k) {
        home_send_.narrow(2, end_row, seqlen_k - end_row).copy_(acc.narrow(2, end_row, seqlen_k - end_row));
    }
}

void RingBackward::compute(int phase) {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    if (!exchanges_[phase].empty()) transferred_events_[phase % 2].record(comm_stream_);
    if (phase == world_size_) return;  // the last phase only brings this rank's dK/dV home
    // held(p) arrived in phase p - 1, which also follows the add that last read this partial buffer.
    if (phase >= 1) transferred_events_[(phase - 1) % 2].block(compute_stream_);
    for (at::Tensor& rows : zero_first_[phase]) rows.zero_();
    for (GradCall& call : calls_[phase]) {
        flash_bwd_accumulate(call.dout, call.q, call.k, call.v, call.lse, call.delta, call.dq_accum, call.dk_accum,
                             call.dv_accum, softmax_scale_, call.key_offset_min, call.key_offset_max,
                             call.dkv_overwrite);
    }
    computed_events_[phase % 2].record(compute_stream_);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> RingBackward::finish() {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    // The K/V blocks are no longer needed (see release_received): the slot that home_ does not
    // occupy (rings of three or more) is freed before the casts below allocate, which keeps it out of
    // the backward's peak memory.
    held_.release_received();
    at::Tensor dq = dq_accum_.to(dtype_);  // before the wait: overlaps the last hop of dK/dV
    if (world_size_ == 1) return {dq, acc_[0][0].to(dtype_), acc_[0][1].to(dtype_)};
    transferred_events_[world_size_ % 2].block(compute_stream_);
    return {dq, home_[0], home_[1]};
}

}  // namespace ring_attn
