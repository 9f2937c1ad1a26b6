// A background thread that notices when a ring's transfers stop making progress on the GPU.
//
// The ring only enqueues its NCCL send/recv and returns; if a peer never posts the matching
// operations (it died, or stopped calling the ring), the transfers spin on the GPU forever and the
// hang surfaces far away, at some later synchronisation. So every ring call marks the end of its
// transfers with an event (watch()), and this thread looks at the oldest unfinished mark every
// kPollInterval: when one is still pending after the timeout, or check_health() reports an error,
// it calls on_failure once, on this thread, with the reason.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ring_attn {

class TransferWatchdog {
  public:
    using Clock = std::chrono::steady_clock;
    static constexpr std::chrono::milliseconds kPollInterval{100};

    // check_health: returns an empty string while all is well, else what went wrong (called on the
    // watchdog thread while transfers are pending). on_failure(reason): see above.
    TransferWatchdog(int device, double timeout_s, std::function<std::string()> check_health,
                     std::function<void(const std::string&)> on_failure);
    // Stops the thread (no failure is reported afterwards) and releases the events.
    ~TransferWatchdog();
    TransferWatchdog(const TransferWatchdog&) = delete;
    TransferWatchdog& operator=(const TransferWatchdog&) = delete;

    // Watches the work enqueued on `stream` so far. A stream being captured into a CUDA graph is
    // not watched (its work runs only when the graph is launched).
    void watch(cudaStream_t stream);

  private:
    struct Mark {
        cudaEvent_t event;
        Clock::time_point deadline;
    };

    void run();
    // One look at the oldest marks; returns the failure reason, or an empty string.
    std::string check_pending();

    const int device_;
    const Clock::duration timeout_;
    const std::function<std::string()> check_health_;
    const std::function<void(const std::string&)> on_failure_;

    std::mutex mutex_;
    std::condition_variable wake_;
    bool stopping_ = false;
    std::deque<Mark> pending_;          // in the order of their stream (one stream per communicator)
    std::vector<cudaEvent_t> spare_;    // completed events, reused by watch()
    std::thread thread_;                // last: starts once everything above exists
};

}  // namespace ring_attn
