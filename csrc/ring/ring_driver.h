// The two drivers of the ring step machines (RingForward, RingBackward): both run the same
// protocol, phase by phase: machine.exchange(p), the transport, machine.compute(p). Host code
// only enqueues work: nothing here waits for the GPU.
#pragma once

#include <c10/util/Exception.h>
#include "../check_message.h"

#include <memory>
#include <vector>

#include "ring/cuda_event.h"
#include "ring/ring_communicator.h"
#include "ring/ring_transport.h"

namespace ring_attn {

// This process's rank of a real ring: builds the step machine with make() (a unique_ptr), runs
// its phases and returns its finish(). `comm` may be null only for a ring of one rank, which
// exchanges nothing; `compute` is the caller's stream, where the machine's buffers were allocated.
//
// When anything throws on this rank (an allocation that runs out of memory, a kernel launch, an
// NCCL call), the ring must not take memory or later calls down with it:
//  - Until every exchange of this rank is enqueued, its peers wait for transfers it will never
//    make, and a later call on this communicator would pair with their stale ones, silently one
//    call out of step. So the communicator is aborted: later calls on it raise, and the peers'
//    watchdogs end them (their ring cannot finish).
//  - Transfers and comm-stream additions may still be queued when the machine's buffers are
//    freed, and the caching allocator hands freed memory to the caller's stream at once. So the
//    caller's stream first waits for the comm stream (aborting ends NCCL's kernels, so this wait
//    ends too); the machine is destroyed after that, when the exception leaves this function.
template <typename MakeMachine>
auto run_nccl_ring(MakeMachine make, RingCommunicator* comm, cudaStream_t compute) {
    decltype(make()) machine;
    bool all_enqueued = false;
    try {
        machine = make();
        for (int phase = 0; phase < machine->num_phases(); ++phase) {
            const Exchange& exchange = machine->exchange(phase);
            if (!exchange.empty()) {
                RA_CHECK(comm != nullptr, "a ring of several ranks needs an NCCL communicator");
                nccl_exchange(*comm, exchange, machine->comm_stream());
            }
            machine->compute(phase);
        }
        all_enqueued = true;
        if (comm != nullptr) comm->watch_transfers();
        return machine->finish();
    } catch (...) {
        if (comm != nullptr) {
            if (!all_enqueued) comm->abort("an earlier ring call failed on this rank before it enqueued all its "
                                           "transfers, so the ring's ranks are out of step");
            order_after(compute, comm->stream());
        }
        throw;
    }
}

// All ranks of a ring in this process: machines[r] is virtual rank r. Every machine reaches a
// phase's exchange before the transport pairs their buffers, as NCCL ranks would.
template <typename Machine>
void run_loopback_ring(std::vector<std::unique_ptr<Machine>>& machines, LoopbackTransport& transport) {
    std::vector<const Exchange*> exchanges(machines.size());
    const int phases = machines.front()->num_phases();
    for (int phase = 0; phase < phases; ++phase) {
        for (size_t rank = 0; rank < machines.size(); ++rank) exchanges[rank] = &machines[rank]->exchange(phase);
        transport.exchange(exchanges);
        for (auto& machine : machines) machine->compute(phase);
    }
}

}  // namespace ring_attn
