// gpusock/net/localdevice_host.hpp — the host side of the localdevice family: enabling it
// on a runtime, reading its state while kernels run, and parsing addresses in
// configuration. Host-only.
//
//   auto rt = gpusock::Runtime::create();
//   auto ld = gpusock::net::enable_localdevice(**rt);      // before launching kernels
//   ... kernels use AF_LOCALDEVICE sockets ...
//   auto snap = (*ld)->snapshot();                          // listeners, connections, bytes
//
//   auto a = gpusock::net::resolve_address("localdevice:42");  // or "10.0.0.1:80", "[::1]:80"
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/status.hpp"

namespace gpusock::net {

struct LocalDeviceOptions {
  // Sockets that may exist at once (each connection is two: one per side), 1..65536.
  uint32_t max_sockets = 4096;
  // Receive ring per socket, a power of two from 4 KiB to 1 GiB. A stream's sender blocks
  // once this many bytes wait unread; the largest datagram is ring_bytes - 8; a listener's
  // accept queue holds ring_bytes / 8 connections. Device memory: max_sockets * ring_bytes.
  uint32_t ring_bytes = 32u << 10;
  // A stream recv that would wait on an empty ring offers its buffer (in global memory)
  // to the sender, which then copies straight into it: one copy per byte instead of two
  // (docs/architecture.md 13.4). Off: every byte goes through the ring.
  bool hand_off = true;
};

struct LocalSocketInfo {
  int fd = -1;               // the descriptor kernels use (-1: a connection not yet accepted)
  uint32_t index = 0;
  uint32_t generation = 0;
  int type = 0;              // SOCK_STREAM or SOCK_DGRAM
  std::string state;         // "open", "listening", "connected"
  bool closed = false;       // its descriptor is closed; calls in progress still hold it
  uint32_t port = 0;         // 0: unbound
  uint32_t peer_port = 0;    // stream peer, or a datagram socket's connect()ed destination
  uint64_t queued = 0;       // bytes waiting in its ring (listener: connections to accept)
  uint32_t backlog = 0;      // listener
  uint64_t bytes_in = 0;     // received (consumed) so far
  uint64_t bytes_direct = 0; // of bytes_in, those that went straight from a send's buffer to a recv's
  uint64_t bytes_out = 0;    // sent so far
};

struct LocalDeviceSnapshot {
  uint32_t max_sockets = 0;
  uint32_t ring_bytes = 0;
  std::vector<LocalSocketInfo> sockets;  // sockets in use, by index
  uint32_t listeners = 0;
  uint32_t connected = 0;    // connected stream sockets (a connection has two)
  uint64_t queued_bytes = 0; // over every ring, listeners excluded
  uint64_t direct_bytes = 0; // bytes_direct over the sockets in use
};

class LocalDevice {
 public:
  LocalDevice(Runtime& rt, void* table, LocalDeviceOptions options)
      : rt_(rt), table_(table), options_(options) {}
  const LocalDeviceOptions& options() const { return options_; }
  // A copy of the state, read from device memory while kernels run (fields of a socket
  // that changes during the copy may come from either side of the change).
  Result<LocalDeviceSnapshot> snapshot() const;

 private:
  Runtime& rt_;  // the LocalDevice must not outlive it
  void* table_;
  LocalDeviceOptions options_;
};

// Builds the family's state in device memory (freed with the runtime) and publishes it to
// kernels. Returns EINVAL for options out of range, EEXIST when already enabled, ENOMEM.
Result<std::shared_ptr<LocalDevice>> enable_localdevice(Runtime& rt, const LocalDeviceOptions& options = {});

// An address from configuration text: "localdevice:N", "a.b.c.d:port" or "[ipv6]:port".
// EINVAL with the reason for anything else.
struct ResolvedAddress {
  sockaddr_storage addr{};
  socklen_t len = 0;
  int family = 0;
};
Result<ResolvedAddress> resolve_address(std::string_view text);
// The text form of an address resolve_address() understands.
std::string address_to_string(const sockaddr* addr, socklen_t len);

}  // namespace gpusock::net
