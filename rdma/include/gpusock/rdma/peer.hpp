// gpusock/rdma/peer.hpp — a CPU program's end of gpusock's RDMA stream protocol, so host
// code can talk to kernels whose sockets the RDMA backend serves (and test them). Blocking
// calls on one thread; the same connection engine as the backend, driven by the caller.
//
//   auto peer = gpusock::rdma::Peer::create();
//   if (!peer.ok()) return fail(peer.status());           // ENODEV: no RDMA device
//   int fd = (*peer)->connect("10.77.0.1", 7000);          // a kernel listens there
//   (*peer)->send(fd, "ping", 4);
//   char buf[4];
//   (*peer)->recv(fd, buf, 4, /*all=*/true);
//   (*peer)->close(fd);
//
// The command-line tool gpusock-rdma-peer wraps it (gpusock-rdma-peer --help).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "gpusock/hostcall/status.hpp"

namespace gpusock::rdma {

namespace internal {
class Engine;
}

struct PeerOptions {
  uint32_t recv_buffers = 16;
  uint32_t recv_buffer_bytes = 64 * 1024;
  // Registered bounce memory sends are copied into (split in 4 so copies overlap sends).
  uint32_t send_buffer_bytes = 4u << 20;
  std::string device;  // "" = the first RDMA device
  // How long a blocking call polls the CQ before it sleeps on the completion channel.
  // Polling saves a scheduler wake-up per completion where a core is free for it; on a
  // machine with fewer cores than busy threads (the 2-vCPU test VM) it only steals time
  // from the other end, so the default is to sleep at once.
  uint32_t spin_us = 0;
};

class Peer {
 public:
  // Opens the device. Errors: ENODEV (no RDMA device), EINVAL (options).
  static Result<std::unique_ptr<Peer>> create(const PeerOptions& options = {});
  ~Peer();
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  // Every call returns >= 0 on success or -errno, and blocks (timeout_ms < 0: no limit;
  // ETIMEDOUT past it).
  // A listener on host:port (port 0: any; the port chosen goes to *bound_port).
  int listen(const std::string& host, uint16_t port, int backlog = 128, uint16_t* bound_port = nullptr);
  // The next connection (fd).
  int accept(int listener, int timeout_ms = -1);
  // Connects (fd). ECONNREFUSED when nobody listens there.
  int connect(const std::string& host, uint16_t port, int timeout_ms = 10000);
  // Sends all `len` bytes; returns len, or the bytes sent before an error (-errno if none).
  int64_t send(int fd, const void* data, size_t len);
  // Receives up to `len` bytes (all of them when `all`, unless the stream ends first).
  // Returns the bytes, 0 at end of stream, or -errno (ECONNRESET: the peer vanished).
  int64_t recv(int fd, void* data, size_t len, bool all = false, int timeout_ms = -1);
  int shutdown_write(int fd);
  // Closes (sends FIN after queued bytes). Returns 0 or -EBADF.
  int close(int fd);
  // Runs the engine until every closed connection finished its FIN, at most timeout_ms.
  void drain(int timeout_ms = 2000);

 private:
  Peer() = default;
  template <typename Pred>
  bool run_until(Pred done, int timeout_ms);
  std::unique_ptr<internal::Engine> e_;
  uint8_t* send_buf_ = nullptr;
  uint32_t send_lkey_ = 0;
  uint32_t send_slot_bytes_ = 0;
  uint32_t spin_us_ = 0;
};

}  // namespace gpusock::rdma
