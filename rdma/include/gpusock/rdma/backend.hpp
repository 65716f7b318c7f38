// gpusock/rdma/backend.hpp — sockets for kernels over RDMA: SOCK_STREAM connections on
// reliable-connected queue pairs (libibverbs + librdmacm), speaking gpusock's RDMA stream
// protocol (wire.hpp). Host-only.
//
//   auto rt = gpusock::Runtime::create();
//   if (auto s = gpusock::rdma::enable(**rt); !s.ok()) {        // ENODEV: no RDMA device
//     std::fprintf(stderr, "%s\n", s.to_string().c_str());
//     return 1;
//   }
//   gpusock::launch(**rt, {1}, {32}, MyServer{});  // the same socket code as over TCP
//
// Or let a policy choose per socket between TCP (io_uring) and RDMA, with unchanged kernel
// code (policy.hpp):
//
//   auto p = gpusock::rdma::Policy::parse("rdma listen *:7000-7999; rdma connect 10.77.0.0/16");
//   gpusock::rdma::enable_with_policy(**rt, *p);
//
// Connections go through rdma_cm (RDMA_PS_TCP port space, so addresses and ports look like
// TCP's); both ends must speak this protocol (a CPU program uses peer.hpp). Completions are
// reaped by the hostcall service threads between calls; an idle thread parks in poll(2) on
// the completion channel and the rdma_cm event channel. Received bytes land in pinned
// receive buffers the device reads directly; sends go straight from the registered
// staging arena. docs/architecture.md, section 14, has the whole picture.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/status.hpp"
#include "gpusock/iouring/backend.hpp"
#include "gpusock/net/backend.hpp"
#include "gpusock/rdma/policy.hpp"

namespace gpusock::rdma {

struct Options {
  // Receive buffers per connection (>= 4) and their size: a peer sends at most
  // recv_buffers messages of at most recv_buffer_bytes before it needs credits back.
  uint32_t recv_buffers = 16;
  uint32_t recv_buffer_bytes = 64 * 1024;
  // Send work requests per QP (>= 8).
  uint32_t send_queue_depth = 64;
  // Most sockets at once (socket() and accept() beyond it: EMFILE).
  uint32_t max_sockets = 4096;
  // rdma_resolve_addr / rdma_resolve_route timeouts; past them connect() gives
  // EHOSTUNREACH / ENETUNREACH.
  uint32_t resolve_timeout_ms = 5000;
  // How long a closed connection may take to send what was queued and its FIN.
  uint32_t linger_ms = 10000;
  // RDMA device by name (e.g. "rxe0"); empty: the first one rdma_cm lists.
  std::string device;
};

// True when ibv_get_device_list() finds at least one RDMA device.
bool device_present();

// Makes the RDMA backend for `rt`: opens the device, registers the staging arena as a
// memory region. Errors: ENODEV (no RDMA device, or none named Options::device), EINVAL
// (options), or the verbs call's errno, each with a message saying what to do.
Result<std::shared_ptr<net::Backend>> create_backend(Runtime& rt, const Options& options = {});

// create_backend() + net::attach().
Status enable(Runtime& rt, const Options& options = {});

// A backend that serves each socket with `tcp` or `rdma` (a backend create_backend made),
// as `policy` or the socket's kSoTransport option says. Errors: EINVAL (rdma is not an RDMA
// backend of this library).
Result<std::shared_ptr<net::Backend>> create_router(std::shared_ptr<net::Backend> tcp,
                                                    std::shared_ptr<net::Backend> rdma, Policy policy);

// iouring::create_backend + create_backend + create_router + net::attach.
Status enable_with_policy(Runtime& rt, Policy policy, const Options& options = {},
                          const iouring::Options& tcp_options = {});

}  // namespace gpusock::rdma
