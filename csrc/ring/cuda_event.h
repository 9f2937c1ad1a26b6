// A CUDA event owned by one object, created once (before any ring loop runs) and re-recorded as
// often as needed: cudaStreamWaitEvent orders against the event's most recent record at the time
// of the wait call, so a ring step machine can keep a fixed, tiny pool of events instead of
// creating one per step.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace ring_attn {

class CudaEvent {
  public:
    // Created on the current device. Timing is off: these events only order streams.
    CudaEvent() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
    ~CudaEvent() {
        if (event_ != nullptr) cudaEventDestroy(event_);  // no throw from a destructor
    }
    CudaEvent(const CudaEvent&) = delete;
    CudaEvent& operator=(const CudaEvent&) = delete;
    CudaEvent(CudaEvent&& other) noexcept : event_(other.event_) { other.event_ = nullptr; }
    CudaEvent& operator=(CudaEvent&&) = delete;

    // Marks the point in `stream` after all work enqueued on it so far.
    void record(cudaStream_t stream) { C10_CUDA_CHECK(cudaEventRecord(event_, stream)); }
    // Work enqueued on `stream` after this call runs after the last recorded point.
    void block(cudaStream_t stream) const { C10_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0)); }

  private:
    cudaEvent_t event_ = nullptr;
};

// Work enqueued on `waiter` after this call runs after everything enqueued on `waited` so far.
// For error paths, so it never throws: the exception being handled already says what went wrong.
inline void order_after(cudaStream_t waiter, cudaStream_t waited) noexcept {
    cudaEvent_t event = nullptr;
    if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) == cudaSuccess) {
        if (cudaEventRecord(event, waited) == cudaSuccess) cudaStreamWaitEvent(waiter, event, 0);
        cudaEventDestroy(event);
    }
    // Leave no error of these calls behind for an unrelated later launch check to report.
    (void)cudaGetLastError();
}

}  // namespace ring_attn
