// gpusock/rdma/policy.hpp — which transport a socket uses, decided on the host, so the
// same kernel code runs over TCP on one system and RDMA on another. Host-only except the
// option constants, which kernels pass to setsockopt().
//
//   auto p = gpusock::rdma::Policy::parse("rdma listen *:7000-7999; rdma connect 10.77.0.0/16; tcp *");
//   // kernel side, to force a transport on one socket before bind/connect:
//   int t = static_cast<int>(gpusock::rdma::Transport::kRdma);
//   gpusock::setsockopt(fd, gpusock::rdma::kSolGpusock, gpusock::rdma::kSoTransport, &t, sizeof t);
//
// Rules are tried in order; the first that matches decides; no match means `tcp`. A rule
// is `TRANSPORT [DIRECTION] ADDRESS[:PORTS]`:
//   TRANSPORT  rdma | tcp
//   DIRECTION  connect (the destination of connect()), listen (the address of bind()),
//              any (the default)
//   ADDRESS    * (every address, IPv4 and IPv6) or an IPv4 prefix a.b.c.d[/len]
//   PORTS      a port or a range lo-hi (default: every port)
// Rules are separated by ';' or newlines.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "gpusock/hostcall/status.hpp"
#include "gpusock/net/protocol.hpp"

namespace gpusock::rdma {

// setsockopt(fd, kSolGpusock, kSoTransport, &int, sizeof(int)) before bind/listen/connect
// chooses the transport of that socket (Transport's values; kAuto leaves it to the
// policy). getsockopt answers the transport in use (kAuto until chosen).
inline constexpr int kSolGpusock = net::kSolGpusock;  // "GP": a level no host protocol uses
inline constexpr int kSoTransport = 1;
enum class Transport : int { kAuto = 0, kTcp = 1, kRdma = 2 };
const char* to_string(Transport t);

enum class Direction : uint8_t { kAny, kConnect, kListen };

struct Rule {
  Transport transport = Transport::kTcp;
  Direction direction = Direction::kAny;
  bool any_address = true;
  uint32_t ipv4 = 0;       // host byte order
  uint8_t prefix_len = 0;  // 0..32
  uint16_t port_lo = 0, port_hi = 65535;
};

class Policy {
 public:
  // Parses the rule text. Errors: EINVAL with the offending rule in the message.
  static Result<Policy> parse(std::string_view text);
  void add(const Rule& r) { rules_.push_back(r); }
  // The transport for `addr` used as `dir` (kConnect or kListen): the first matching
  // rule's, else kTcp. An address that is not AF_INET/AF_INET6 gets kTcp.
  Transport choose(const sockaddr* addr, socklen_t len, Direction dir) const;
  const std::vector<Rule>& rules() const { return rules_; }
  std::string to_string() const;

 private:
  std::vector<Rule> rules_;
};

}  // namespace gpusock::rdma
