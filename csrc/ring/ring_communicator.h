// The NCCL communicator of one ring: built from an ncclUniqueId that the group's rank 0 made and
// the group shared, bound to one CUDA device, with the dedicated stream that carries the ring's
// transfers (so they overlap the attention kernels on the caller's stream).
//
// No rank may hang forever on a peer that died or stopped calling the ring. The communicator is
// non-blocking (NCCL returns ncclInProgress instead of waiting inside a call), so every host-side
// wait (joining, connecting, enqueueing) has a deadline of timeout_s: past it the communicator is
// aborted and the call raises. Transfers that were enqueued but never complete on the GPU are
// caught by a TransferWatchdog: past the timeout, or on an asynchronous NCCL error, it ends the
// process with a message on stderr, as PyTorch's NCCL watchdog does:
// the results of the unfinished ring would be wrong, and the other ranks' torchrun (or the job
// scheduler) restarts from a checkpoint.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "ring/transfer_watchdog.h"

namespace ring_attn {

// Throws a c10::Error naming `what` and NCCL's explanation when `result` is not ncclSuccess.
void check_nccl(ncclResult_t result, const char* what, ncclComm_t comm);

// A fresh ncclUniqueId as NCCL_UNIQUE_ID_BYTES raw bytes, for the group to share.
std::string nccl_unique_id();

class RingCommunicator {
  public:
    // Collective: every rank of the ring calls it with the same `unique_id`; waits at most
    // timeout_s seconds for all of them to join.
    RingCommunicator(const std::string& unique_id, int rank, int world_size, int device, double timeout_s);
    // Aborts a communicator that destroy() did not release (never blocks, unlike a destroy).
    ~RingCommunicator();
    RingCommunicator(const RingCommunicator&) = delete;
    RingCommunicator& operator=(const RingCommunicator&) = delete;

    // Releases NCCL's resources; the communicator is unusable afterwards. Idempotent.
    void destroy();
    // Aborts the communicator at once (the watchdog is stopped first; NCCL's kernels of it end):
    // for a ring that failed on this rank. Later calls raise, naming `reason`. Never throws.
    void abort(const std::string& reason) noexcept;

    ncclComm_t handle() const;  // throws once destroyed or aborted
    int rank() const { return rank_; }
    int world_size() const { return world_size_; }
    int device() const { return device_; }
    double timeout_s() const { return timeout_s_; }
    int next_rank() const { return (rank_ + 1) % world_size_; }
    int previous_rank() const { return (rank_ + world_size_ - 1) % world_size_; }
    c10::cuda::CUDAStream stream() const { return stream_; }

    // After an NCCL call on this communicator returned `result` (ncclInProgress: NCCL is still
    // working on it in the background), waits until the call has completed on the host (for
    // send/recv: enqueued on the stream). Raises on an error, and after timeout_s seconds aborts
    // the communicator and raises.
    void wait_for_call(ncclResult_t result, const char* what);
    // Hands the transfers enqueued on stream() so far to the watchdog (see the top of this file).
    void watch_transfers();

  private:
    // Aborts the communicator (the watchdog is stopped first) and raises `message`.
    [[noreturn]] void abort_and_raise(const std::string& message);

    ncclComm_t comm_ = nullptr;
    int rank_, world_size_, device_;
    double timeout_s_;
    c10::cuda::CUDAStream stream_;
    std::unique_ptr<TransferWatchdog> watchdog_;
    std::string abort_reason_;  // why abort() ended the communicator; empty if it did not
};

}  // namespace ring_attn
