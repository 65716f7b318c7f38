// gpusock/hostcall/opcodes.hpp — the opcode space. Opcodes are 16-bit values split into
// ranges so that modules, users and tests never collide:
//
//   0x0000-0x00ff  hostcall core (this module): null call, write, ...
//   0x0100-0x0fff  other gpusock modules (net/ sockets, ...)
//   0x1000-0xefff  yours: register a handler with Runtime::register_handler()
//   0xf000-0xffff  reserved for gpusock's own tests
#pragma once

#include <cstdint>

namespace gpusock::hostcall {

inline constexpr uint32_t kOpcodeLimit = 0x10000;
inline constexpr uint32_t kCoreFirst = 0x0000, kCoreLast = 0x00ff;
inline constexpr uint32_t kModuleFirst = 0x0100, kModuleLast = 0x0fff;
inline constexpr uint32_t kUserFirst = 0x1000, kUserLast = 0xefff;
inline constexpr uint32_t kTestFirst = 0xf000, kTestLast = 0xffff;

namespace op {
// Does nothing and answers 0: the round trip, for benchmarks and liveness checks.
inline constexpr uint32_t kNull = 0x0000;
// write(fd, payload): args = {fd, staging offset, length}; answers bytes written or -errno.
inline constexpr uint32_t kWrite = 0x0001;
// write(fd, payload) on a descriptor a module owns (a socket): same arguments as kWrite.
// Served by the module that registers it (net/ does); -ENOSYS (reported as -EBADF on the
// device) when none is.
inline constexpr uint32_t kDescriptorWrite = 0x0002;
}  // namespace op

}  // namespace gpusock::hostcall
