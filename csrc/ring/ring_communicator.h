// The NCCL communicator of one ring: built from an ncclUniqueId that the group's rank 0 made and
// the group shared, bound to one CUDA device, with the dedicated stream that carries the ring's
// transfers (so they overlap the attention kernels on the caller's stream).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <nccl.h>

#include <string>

namespace ring_attn {

// Throws a c10::Error naming `what` and NCCL's explanation when `result` is not ncclSuccess.
void check_nccl(ncclResult_t result, const char* what, ncclComm_t comm);

// A fresh ncclUniqueId as NCCL_UNIQUE_ID_BYTES raw bytes, for the group to share.
std::string nccl_unique_id();

class RingCommunicator {
  public:
    // Collective: every rank of the ring calls it with the same `unique_id` (blocks until all have).
    RingCommunicator(const std::string& unique_id, int rank, int world_size, int device);
    // Aborts a communicator that destroy() did not release (never blocks, unlike a destroy).
    ~RingCommunicator();
    RingCommunicator(const RingCommunicator&) = delete;
    RingCommunicator& operator=(const RingCommunicator&) = delete;

    // Releases NCCL's resources; the communicator is unusable afterwards. Idempotent.
    void destroy();

    ncclComm_t handle() const;  // throws once destroyed
    int rank() const { return rank_; }
    int world_size() const { return world_size_; }
    int device() const { return device_; }
    int next_rank() const { return (rank_ + 1) % world_size_; }
    int previous_rank() const { return (rank_ + world_size_ - 1) % world_size_; }
    c10::cuda::CUDAStream stream() const { return stream_; }

  private:
    ncclComm_t comm_ = nullptr;
    int rank_, world_size_, device_;
    c10::cuda::CUDAStream stream_;
};

}  // namespace ring_attn
