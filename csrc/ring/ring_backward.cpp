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
    const int64_t seqlen_k = k.size(1), heads_kv = k.size(2), group = heads / heads_kv;
    const auto fp32 = q.options().dtype(at::kFloat);
    dq_accum_ = at::empty({batch, seqlen_q, heads, head_dim}, fp32);
    delta_ = flash_bwd_delta(dout, out, dq_accum_);  // also zero-fills dq_accum_

    const bool travels = held_.travels();
    // The own block's kv heads [0, split_) run in phase 0, [split_, h_kv) in phase N, half each.
    // Half of the step hides either hop with room to spare at s_k 8k; smaller first parts launch
    // grids of a few waves (a quarter cost the loopback ring 1% at N = 2, 32 kv heads, causal, where
    // halves cost nothing measurable). A ring of one has no hop to hide and runs them all in phase 0;
    // with one kv head the first part is empty.
    split_ = travels ? heads_kv / 2 : heads_kv;
    auto dkv_buffer = [&](int64_t kv_heads) { return at::empty({2, batch, seqlen_k, kv_heads, head_dim}, fp32); };
    if (split_ > 0) own_first_ = dkv_buffer(split_);
    // Steps p >= 2 compute into partial(p), slot (p - 2) % 2, because acc(p) arrives while they
    // run. Two slots alternate, so one can be filled while the previous one is still being added on
    // the comm stream; a ring of three has a single such step, a ring of two none.
    at::Tensor partials;  // (slots, 2 = dk/dv, b, s_k, h_kv, d)
    if (travels) {
        acc_ = {dkv_buffer(heads_kv), dkv_buffer(heads_kv)};
        const int64_t slots = std::min(2, world_size_ - 2);
        if (slots > 0) partials = at::empty({slots, 2, batch, seqlen_k, heads_kv, head_dim}, fp32);
        // From four ranks on, the partial of step N - 2 (slot N % 2) was added in phase N - 1, which
        // phase N's kernels wait for: the rest of the own share takes its bytes.
        own_second_ = slots == 2 ? partials[world_size_ % 2].narrow(3, split_, heads_kv - split_)
                                 : dkv_buffer(heads_kv - split_);
        result_ = held_.last_slot();
    }
    exchanges_.resize(world_size_ + 1);
    for (int phase = 0; travels && phase <= world_size_; ++phase) {
        Exchange& exchange = exchanges_[phase];
        held_.add_transfer(phase, exchange);
        if (phase >= 2) {
            exchange.sends.push_back(acc_[(phase - 1) % 2]);
            exchange.recvs.push_back(acc_[phase % 2]);  // in phase N: this rank's own accumulator, home
        }
    }
    // Without GQA each dK/dV tile of a call has one owner CTA, so a call whose key rows no earlier
    // call of its phase touched can write its gradients over the buffer instead of adding them to
    // zeros: no zero-fill, and the kernels read nothing back. Under GQA every call adds.
    const bool calls_can_overwrite = heads == heads_kv;
    calls_.resize(world_size_ + 1);
    step_grads_.resize(world_size_ + 1);
    zero_first_.resize(world_size_ + 1);
    for (int phase = 0; phase <= world_size_; ++phase) {
        const bool own_block = phase == 0 || phase == world_size_;
        const int step = phase == world_size_ ? 0 : phase;
        const int64_t head_begin = phase == world_size_ ? split_ : 0;
        const int64_t head_end = phase == 0 ? split_ : heads_kv;
        if (head_begin == head_end) continue;
        // The buffer the phase's kernels write, (2 = dk/dv, b, s_k, head_end - head_begin, d). The own
        // share and acc(1) must hold all their rows afterwards (they are the result, or travel,
        // whole); a partial only the rows the step touches, which are all that is added into acc(p).
        const bool whole = own_block || phase == 1;
        const at::Tensor grads = phase == 0            ? own_first_
                                 : phase == world_size_ ? own_second_
                                 : phase == 1           ? acc_[1]
                                                        : partials[(phase - 2) % 2];
        auto query_heads = [&](const at::Tensor& t, int64_t dim) {
            return t.narrow(dim, head_begin * group, (head_end - head_begin) * group);
        };
        auto key_heads = [&](const at::Tensor& t) { return t.narrow(2, head_begin, head_end - head_begin); };
        const at::Tensor phase_dout = query_heads(dout, 2), phase_q = query_heads(q, 2);
        const at::Tensor phase_lse = query_heads(lse, 1), phase_delta = query_heads(delta_, 1);
        const at::Tensor phase_dq = query_heads(dq_accum_, 2);
        const at::Tensor phase_k = key_heads(held_.k(step)), phase_v = key_heads(held_.v(step));
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
            calls_[phase].push_back(GradCall{rows_q(phase_dout), rows_q(phase_q), rows_k(phase_k), rows_k(phase_v),
                                             phase_lse.narrow(2, piece.q_start, piece.q_len),
                                             phase_delta.narrow(2, piece.q_start, piece.q_len), rows_q(phase_dq),
                                             rows_k(grads[0]), rows_k(grads[1]), piece.key_offset_min,
                                             piece.key_offset_max, overwrite});
            first_row = std::min(first_row, rows.first);
            end_row = std::max(end_row, rows.second);
        }
        if (!whole && !calls_[phase].empty()) {
            // (2 = dk/dv, b, rows, h_kv, d) views: the rows are dimension 2.
            step_grads_[phase] = StepGrads{grads.narrow(2, first_row, end_row - first_row),
                                           acc_[phase % 2].narrow(2, first_row, end_row - first_row)};
        }
        if (whole) first_row = 0, end_row = seqlen_k;
        // The rows of [first_row, end_row) that no overwriting call writes start from zero.
        std::sort(overwritten.begin(), overwritten.end());
        int64_t row = first_row;
        for (const auto& [begin, end] : overwritten) {
            if (begin > row) zero_first_[phase].push_back(grads.narrow(2, row, begin - row));
            row = std::max(row, end);
        }
        if (row < end_row) zero_first_[phase].push_back(grads.narrow(2, row, end_row - row));
    }
    if (travels) {
        // The comm stream starts after everything the caller enqueued and the set-up above.
        inputs_ready_.record(compute_stream_);
        inputs_ready_.block(comm_stream_);
    }
}

const Exchange& RingBackward::exchange(int phase) {
    if (phase >= 1 && !exchanges_[phase].empty()) {
        // Step p - 1 is done: its K/V buffer may take the next block, and its dK/dV are complete.
        computed_events_[(phase - 1) % 2].block(comm_stream_);
        const StepGrads& previous = step_grads_[phase - 1];
        if (previous.partial.defined()) {
            // acc(p - 1) arrived in phase p - 1 on this stream; complete it before it travels on.
            c10::cuda::CUDAStreamGuard guard(comm_stream_);
            previous.acc.add_(previous.partial);
        }
    }
    return exchanges_[phase];
}

void RingBackward::compute(int phase) {
    c10::cuda::CUDAStreamGuard guard(compute_stream_);
    if (!exchanges_[phase].empty()) transferred_events_[phase % 2].record(comm_stream_);
    // Phase p's kernels wait for phase p - 1's transfers: the block of a step p < N arrived then, and
    // they follow the add that last read the partial buffer they write (in phase N: the one that
    // holds the rest of the own share, in rings of four or more).
    if (phase >= 1 && !exchanges_[phase - 1].empty()) transferred_events_[(phase - 1) % 2].block(compute_stream_);
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
    // The K/V blocks are no longer needed (see release_received; result_ keeps the last slot): the
    // other slot (rings of three or more) is freed before the casts below allocate, which keeps it out
    // of the backward's peak memory.
    held_.release_received();
    at::Tensor dq = dq_accum_.to(dtype_);  // before the wait: overlaps the hop home
    if (!held_.travels()) return {dq, own_first_[0].to(dtype_), own_first_[1].to(dtype_)};
    transferred_events_[world_size_ % 2].block(compute_stream_);
    // One pass per part of the own share: it and the accumulator that came home, summed in fp32 and
    // rounded to the input dtype as the stored fp32 sum would be.
    const at::Tensor home = acc_[world_size_ % 2];
    auto add_home = [&](const at::Tensor& own, int64_t head_begin) {
        at::Tensor out = result_.narrow(3, head_begin, own.size(3));
        at::add_out(out, own, home.narrow(3, head_begin, own.size(3)));
    };
    if (split_ > 0) add_home(own_first_, 0);
    add_home(own_second_, split_);
    return {dq, result_[0], result_[1]};
}

}  // namespace ring_attn
