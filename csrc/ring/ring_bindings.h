// Adds the ring's functions and the RingCommunicator class to ring_attn_ext._C (called from
// csrc/module.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace ring_attn {

void register_ring_bindings(pybind11::module_& m);

}  // namespace ring_attn
