// gpusock/hostcall/io.hpp — the first POSIX calls for kernels: write() to the host's
// stdout/stderr through a hostcall, and clock_gettime() answered on the device.
//
//   char line[64];
//   int n = format_line(line);                    // your own formatting
//   gpusock::write(1, line, n);                   // one call's bytes are never split
//   timespec ts;
//   gpusock::clock_gettime(CLOCK_MONOTONIC, &ts); // no hostcall: %globaltimer
#pragma once

#include <cerrno>
#include <cstdint>
#include <ctime>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/opcodes.hpp"

namespace gpusock {

// Bytes of one write() that reach the output as one unbroken run. Longer writes are
// sent in pieces of this size, like writes above PIPE_BUF on a pipe.
inline constexpr uint32_t kAtomicWriteBytes = 4096;

// The errno of the calling thread (lane) after a POSIX-layer call returned -1.
GPUSOCK_HD inline int errno_value() { return hostcall::errno_ref(); }

namespace raw {
// write(2): fds 1 and 2 are the host process's stdout and stderr (runtime options);
// other descriptors go to the module that owns them (net/ sockets: a blocking write sends
// every byte). Returns bytes written, or -errno: -EBADF for a descriptor nobody owns,
// -EFAULT for a null buffer with n > 0, -ESHUTDOWN.
GPUSOCK_HD inline int64_t write(int fd, const void* buf, uint64_t n) {
  if (n > 0 && buf == nullptr) return -EFAULT;
  const uint32_t opcode = (fd == 1 || fd == 2) ? hostcall::op::kWrite : hostcall::op::kDescriptorWrite;
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  uint64_t done = 0;
  // Every lane makes at least one call, so lanes with n == 0 still converge with the
  // rest and get the host's answer for their fd (EBADF is reported even for n == 0).
  do {
    uint32_t piece = static_cast<uint32_t>((n - done) < kAtomicWriteBytes ? (n - done) : kAtomicWriteBytes);
    int64_t r = hostcall::wait(hostcall::submit_with_payload(opcode, p + done, piece, static_cast<int64_t>(fd)));
    if (r == -ENOSYS) r = -EBADF;  // no module owns descriptors in this runtime
    if (r < 0) return done > 0 ? static_cast<int64_t>(done) : r;
    done += static_cast<uint64_t>(r);
    if (static_cast<uint32_t>(r) < piece) break;  // short write: report what went out
  } while (done < n);
  return static_cast<int64_t>(done);
}

// clock_gettime for CLOCK_MONOTONIC and CLOCK_REALTIME, from the device clock plus the
// offsets the runtime measured at start. Issues no hostcall. Returns 0, -EINVAL for any
// other clock, or -EFAULT for a null ts.
GPUSOCK_HD inline int clock_gettime(clockid_t clock, timespec* ts) {
  if (ts == nullptr) return -EFAULT;
  const hostcall::DeviceContext* c = hostcall::context();
  int64_t offset;
  if (clock == CLOCK_MONOTONIC) {
    offset = c->monotonic_offset_ns;
  } else if (clock == CLOCK_REALTIME) {
    offset = c->realtime_offset_ns;
  } else {
    return -EINVAL;
  }
  int64_t t = static_cast<int64_t>(globaltimer_ns()) + offset;
  ts->tv_sec = static_cast<time_t>(t / 1000000000);
  ts->tv_nsec = static_cast<long>(t % 1000000000);
  return 0;
}
}  // namespace raw

// POSIX shape: -1 and errno_value() on failure.
GPUSOCK_HD inline int64_t write(int fd, const void* buf, uint64_t n) {
  int64_t r = raw::write(fd, buf, n);
  if (r < 0) {
    hostcall::errno_ref() = static_cast<int32_t>(-r);
    return -1;
  }
  return r;
}
GPUSOCK_HD inline int clock_gettime(clockid_t clock, timespec* ts) {
  int r = raw::clock_gettime(clock, ts);
  if (r < 0) {
    hostcall::errno_ref() = -r;
    return -1;
  }
  return 0;
}

}  // namespace gpusock
