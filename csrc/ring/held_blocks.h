// The K/V blocks one rank holds as a ring goes round, shared by the forward and backward step
// machines: step 0 holds the rank's own block; step p >= 1 holds the block that arrived from the
// previous rank during phase p - 1. Two receive slots alternate (held(p) is slot (p - 1) % 2), so a
// block can arrive while the previous one is still being read; with two ranks one slot is enough.
// The slots are separate allocations, so that one can outlive the other (see last_slot).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <array>

#include "ring/ring_transport.h"

namespace ring_attn {

class HeldBlocks {
  public:
    // k, v (b, s_k, h_kv, d): this rank's block. Copies and receive slots are allocated on `stream`
    // (the compute stream of the machine that owns them).
    HeldBlocks(const at::Tensor& k, const at::Tensor& v, int world_size, c10::cuda::CUDAStream stream)
        : world_size_(world_size) {
        c10::cuda::CUDAStreamGuard guard(stream);
        // A block that travels must be contiguous (a transfer moves raw bytes); in a ring of one
        // the kernels read the caller's (possibly strided) tensors directly.
        local_k_ = travels() ? k.contiguous() : k;
        local_v_ = travels() ? v.contiguous() : v;
        const int slots = std::min(2, world_size - 1);
        for (int slot = 0; slot < slots; ++slot) {
            slots_[slot] = at::empty({2, k.size(0), k.size(1), k.size(2), k.size(3)}, k.options());
        }
    }

    bool travels() const { return world_size_ > 1; }
    at::Tensor k(int step) const { return step == 0 ? local_k_ : slots_[(step - 1) % 2][0]; }
    at::Tensor v(int step) const { return step == 0 ? local_v_ : slots_[(step - 1) % 2][1]; }

    // The receive slot of the last step's block (travelling rings only): (2 = k/v, b, s_k, h_kv, d)
    // in the input dtype. Nothing arrives in it after phase N - 2, and only the last step's kernels
    // read it, so once they are done its bytes may take other data of that shape (the backward
    // writes this rank's dK/dV, in the input dtype, into it).
    at::Tensor last_slot() const { return slots_[(world_size_ - 2) % 2]; }

    // Adds phase p's K/V transfer to `exchange`: send held(p), receive held(p + 1). The block of
    // the last step goes nowhere.
    void add_transfer(int phase, Exchange& exchange) const {
        if (phase + 1 >= world_size_) return;
        exchange.sends.insert(exchange.sends.end(), {k(phase), v(phase)});
        exchange.recvs.insert(exchange.recvs.end(), {k(phase + 1), v(phase + 1)});
    }

    // Frees the receive slots. Call on the compute stream once the last step's kernels are
    // enqueued: every transfer into or out of a slot is ordered before that step (its wait for the
    // last exchange), so the allocator may hand the bytes to later work on that stream.
    void release_received() { slots_ = {}; }

  private:
    int world_size_;
    at::Tensor local_k_, local_v_;
    std::array<at::Tensor, 2> slots_;  // each (2 = k/v, b, s_k, h_kv, d)
};

}  // namespace ring_attn
