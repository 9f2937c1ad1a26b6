// Argument-check macros whose messages never format numbers through std::ostream.
//
// Why: on the GPU image we build on, the extension is compiled by a newer g++ (/opt/gcc) than the
// libstdc++ the process loads, and formatting a number through an ostream inside the extension
// (what TORCH_CHECK's message building does for ints, doubles and shapes) crashed with a segfault
// instead of raising (seen 2026-11-23 on H100, torch 2.11). Strings pass through unchanged, and
// std::to_string formats numbers with snprintf, which is safe on every toolchain.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace ring_attn {

inline std::string message_part(const char* text) { return text; }
inline std::string message_part(const std::string& text) { return text; }
inline std::string message_part(c10::ScalarType dtype) { return c10::toString(dtype); }
inline std::string message_part(const c10::Device& device) { return device.str(); }
inline std::string message_part(c10::IntArrayRef sizes) {
    std::string text = "[";
    for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
    return text + "]";
}
template <typename Number, std::enable_if_t<std::is_arithmetic_v<Number>, int> = 0>
std::string message_part(Number value) {
    if constexpr (std::is_same_v<Number, bool>) return value ? "true" : "false";
    else return std::to_string(value);
}

template <typename... Parts>
std::string check_message(const Parts&... parts) {
    return (std::string() + ... + message_part(parts));
}

}  // namespace ring_attn

// The message is only built when the check fails, as with TORCH_CHECK.
#define RA_CHECK(cond, ...) TORCH_CHECK(cond, ::ring_attn::check_message(__VA_ARGS__))
#define RA_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::ring_attn::check_message(__VA_ARGS__))
#define RA_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::ring_attn::check_message(__VA_ARGS__))
