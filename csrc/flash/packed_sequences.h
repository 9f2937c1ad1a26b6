// Varlen launches (FwdParams::sequences, BwdParams::sequences): a CTA reads its table entry and
// turns the launch's parameters into those of its one sequence, a batch of one whose pointers start
// at the sequence's first rows. The tile code then runs unchanged, its row predicates and masks
// bounded by the sequence's own lengths and band instead of the launch's.
#pragma once

#include <cute/config.hpp>

#include "flash_params.h"

namespace ring_attn {

// The entry of one varlen CTA; every thread of the CTA reads the same 24 bytes.
CUTE_DEVICE PackedSequence load_packed_sequence(const PackedSequence* table, int index) {
    const int* entry = reinterpret_cast<const int*>(table + index);
    return {__ldg(entry + 0), __ldg(entry + 1), __ldg(entry + 2),
            __ldg(entry + 3), __ldg(entry + 4), __ldg(entry + 5)};
}

// Fields a sequence changes in either params struct: lengths, band, and q/k/v rows.
template <typename Element, typename Params>
CUTE_DEVICE void restrict_inputs(Params& p, const PackedSequence& s) {
    p.q = static_cast<const Element*>(p.q) + int64_t(s.q_begin) * p.q_row_stride;
    p.k = static_cast<const Element*>(p.k) + int64_t(s.k_begin) * p.k_row_stride;
    p.v = static_cast<const Element*>(p.v) + int64_t(s.k_begin) * p.v_row_stride;
    p.batch = 1;
    p.seqlen_q = s.q_end - s.q_begin;
    p.seqlen_k = s.k_end - s.k_begin;
    p.mask.key_offset_min = s.key_offset_min;
    p.mask.key_offset_max = s.key_offset_max;
    p.sequences = nullptr;
}

// A plain forward of the sequence: out rows from q_begin, lse (heads, total_q) from column q_begin.
template <typename Element>
CUTE_DEVICE FwdParams sequence_params(const FwdParams& all, const PackedSequence& s) {
    FwdParams p = all;
    restrict_inputs<Element>(p, s);
    p.out = static_cast<Element*>(p.out) + int64_t(s.q_begin) * p.o_row_stride;
    p.lse = p.lse + s.q_begin;
    return p;
}

// The sequence's backward: dout, lse, delta and dq_accum from its query rows, dk_accum and dv_accum
// from its key rows.
template <typename Element>
CUTE_DEVICE BwdParams sequence_params(const BwdParams& all, const PackedSequence& s) {
    BwdParams p = all;
    restrict_inputs<Element>(p, s);
    p.dout = static_cast<const Element*>(p.dout) + int64_t(s.q_begin) * p.do_row_stride;
    p.lse = p.lse + s.q_begin;
    p.delta = p.delta + s.q_begin;
    p.dq_accum = p.dq_accum + int64_t(s.q_begin) * p.dq_row_stride;
    p.dk_accum = p.dk_accum + int64_t(s.k_begin) * p.dk_row_stride;
    p.dv_accum = p.dv_accum + int64_t(s.k_begin) * p.dv_row_stride;
    return p;
}

}  // namespace ring_attn
