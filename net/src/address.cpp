// Address text for configuration: resolve_address() and address_to_string(). Apart from
// localdevice.cpp so that it builds alone (tests/fuzz compiles it with nothing else).
#include <arpa/inet.h>
#include <netinet/in.h>

#include <charconv>
#include <cstring>

#include "gpusock/net/localdevice.hpp"
#include "gpusock/net/localdevice_host.hpp"

namespace gpusock::net {

Result<ResolvedAddress> resolve_address(std::string_view text) {
  ResolvedAddress out;
  const std::string str(text);
  // The parsers below read C strings: a NUL would end the text early and leave what
  // follows it unread, so "localdevice:1\0junk" would pass as localdevice:1.
  if (text.find('\0') != std::string_view::npos) {
    return Status{EINVAL, "'" + str + "': address text contains a NUL byte"};
  }
  sockaddr_ld ld{};
  if (text.starts_with("localdevice:")) {
    if (ld_pton(str.c_str(), &ld) != 1) {
      return Status{EINVAL, "'" + str + "': a localdevice address is localdevice:N with N in 0..65535"};
    }
    std::memcpy(&out.addr, &ld, sizeof ld);
    out.len = sizeof ld;
    out.family = AF_LOCALDEVICE;
    return out;
  }
  std::string host;
  std::string_view port_text;
  if (text.starts_with("[")) {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return Status{EINVAL, "'" + str + "': an IPv6 address is [addr]:port"};
    }
    host = std::string(text.substr(1, close - 1));
    port_text = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) {
      return Status{EINVAL, "'" + str + "': expected localdevice:N, a.b.c.d:port or [ipv6]:port"};
    }
    host = std::string(text.substr(0, colon));
    port_text = text.substr(colon + 1);
    if (host.find(':') != std::string::npos) {
      return Status{EINVAL, "'" + str + "': an IPv6 address goes in brackets: [addr]:port"};
    }
  }
  unsigned port = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc{} || end != port_text.data() + port_text.size() || port > 65535) {
    return Status{EINVAL, "'" + str + "': the port must be a number 0..65535"};
  }
  sockaddr_in a4{};
  sockaddr_in6 a6{};
  if (::inet_pton(AF_INET, host.c_str(), &a4.sin_addr) == 1) {
    a4.sin_family = AF_INET;
    a4.sin_port = htons(static_cast<uint16_t>(port));
    std::memcpy(&out.addr, &a4, sizeof a4);
    out.len = sizeof a4;
    out.family = AF_INET;
  } else if (::inet_pton(AF_INET6, host.c_str(), &a6.sin6_addr) == 1) {
    a6.sin6_family = AF_INET6;
    a6.sin6_port = htons(static_cast<uint16_t>(port));
    std::memcpy(&out.addr, &a6, sizeof a6);
    out.len = sizeof a6;
    out.family = AF_INET6;
  } else {
    return Status{EINVAL, "'" + str + "': '" + host + "' is not an IPv4 or IPv6 address (names are not looked up)"};
  }
  return out;
}

std::string address_to_string(const sockaddr* addr, socklen_t len) {
  if (addr == nullptr) return "?";
  char buf[INET6_ADDRSTRLEN + 16];
  if (addr->sa_family == AF_LOCALDEVICE && len >= sizeof(sockaddr_ld)) {
    return ld_ntop(reinterpret_cast<const sockaddr_ld*>(addr), buf, sizeof buf) ? buf : "?";
  }
  if (addr->sa_family == AF_INET && len >= sizeof(sockaddr_in)) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(addr);
    ::inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    return std::string(buf) + ":" + std::to_string(ntohs(a->sin_port));
  }
  if (addr->sa_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(addr);
    ::inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    return "[" + std::string(buf) + "]:" + std::to_string(ntohs(a->sin6_port));
  }
  return "?";
}

}  // namespace gpusock::net
