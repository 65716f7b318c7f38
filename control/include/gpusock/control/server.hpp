// gpusock/control/server.hpp — the gRPC control plane, served from inside the host
// process: what an operator sees of a running runtime (info, stats, sockets, localdevice)
// and what they may steer (abort a socket, drain, log level), off the hot path.
//
//   auto rt = gpusock::Runtime::create();
//   auto be = gpusock::iouring::create_backend(**rt);
//   gpusock::net::attach(**rt, *be);
//   auto ctl = gpusock::control::ControlServer::start(**rt, {.backends = {*be}});
//   // gpusockctl finds it: $XDG_RUNTIME_DIR/gpusock-<pid>.sock (or /tmp/...)
//   ...
//   (*ctl)->stop();   // before the runtime goes away (the destructor stops it too)
//
// The service is gpusock.control.v1.Control (control/proto/gpusock/control/v1/
// control.proto), with server reflection. This header pulls in no gRPC header: only
// targets that link gpusock::control see gRPC at all. Host-only.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/status.hpp"
#include "gpusock/net/backend.hpp"
#include "gpusock/net/localdevice_host.hpp"

namespace gpusock::control {

// What the server reports on and steers. The runtime and everything here must outlive
// the server (stop() it first).
struct Sources {
  std::vector<std::shared_ptr<net::Backend>> backends;
  std::shared_ptr<net::LocalDevice> localdevice;  // null: the family is not enabled
  // Shown by GetInfo under "config", beside what the runtime reports itself.
  std::map<std::string, std::string> config;
};

struct ServerOptions {
  // The unix socket: "" picks $XDG_RUNTIME_DIR/gpusock-<pid>.sock, or /tmp/... when the
  // variable is unset. Mode 0600, removed by stop(). unix_socket = false: none.
  bool unix_socket = true;
  std::string unix_path;
  // Optional TCP listener, "host:port" ("127.0.0.1:0" picks a free port; tcp_port() says
  // which). Every call over TCP must carry `authorization: Bearer <token>` metadata, or
  // fails UNAUTHENTICATED. Loopback only unless allow_non_loopback; a non-loopback
  // listener is plaintext (see docs/architecture.md, section 15).
  std::string tcp_address;
  std::string token;
  bool allow_non_loopback = false;
  // Events a WatchEvents stream may have queued before the server ends it with
  // RESOURCE_EXHAUSTED (a client that stopped reading cannot make the server grow).
  uint32_t watch_queue = 4096;
  // The server's log threshold: "error", "warn", "info" or "debug" (SetLogLevel changes it).
  std::string log_level = "warn";
};

class ControlServer {
 public:
  // Starts serving. Returns EINVAL (bad options: a TCP address without a token, a
  // non-loopback address not allowed, no listener at all), EADDRINUSE or EIO when gRPC
  // could not listen, ENAMETOOLONG for a unix path over 107 bytes.
  static Result<std::unique_ptr<ControlServer>> start(Runtime& rt, Sources sources, ServerOptions options = {});
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Ends open streams and calls, stops listening, removes the unix socket and detaches
  // from the backends. Idempotent.
  void stop();

  std::string unix_path() const;  // "" without one
  int tcp_port() const;           // 0 without a TCP listener
  // "unix:<path>" (or "<host>:<port>" without a unix socket): what gpusockctl --endpoint takes.
  std::string endpoint() const;

  struct Impl;

 private:
  explicit ControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The unix socket path start() picks for process `pid` when ServerOptions::unix_path is "".
std::string default_unix_path(long pid);

}  // namespace gpusock::control
