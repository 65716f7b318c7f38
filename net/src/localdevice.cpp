// The host side of the localdevice family: the table in device memory, snapshots of it,
// and the address resolver for configuration text.
#include "gpusock/net/localdevice_host.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <charconv>
#include <cstring>

#include "gpusock/net/localdevice.hpp"

namespace gpusock::net {

namespace {

bool power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

const char* state_name(uint32_t s) {
  switch (s) {
    case local::kOpen: return "open";
    case local::kListening: return "listening";
    case local::kConnected: return "connected";
    default: return "free";
  }
}

}  // namespace

Result<std::shared_ptr<LocalDevice>> enable_localdevice(Runtime& rt, const LocalDeviceOptions& options) {
  if (options.max_sockets == 0 || options.max_sockets > local::kMaxSockets) {
    return Status{EINVAL, "max_sockets must be 1.." + std::to_string(local::kMaxSockets)};
  }
  if (!power_of_two(options.ring_bytes) || options.ring_bytes < 4096 || options.ring_bytes > (1u << 30)) {
    return Status{EINVAL, "ring_bytes must be a power of two from 4096 to 1 GiB"};
  }
  const uint64_t sockets_bytes = uint64_t{options.max_sockets} * sizeof(local::Socket);
  const uint64_t ports_bytes = 2ull * local::kPorts * sizeof(uint32_t);
  const uint64_t rings_bytes = uint64_t{options.max_sockets} * options.ring_bytes;
  const uint64_t table_at = 0;
  const uint64_t sockets_at = 256;
  const uint64_t ports_at = sockets_at + (sockets_bytes + 255) / 256 * 256;
  const uint64_t rings_at = ports_at + (ports_bytes + 255) / 256 * 256;
  auto mem = rt.device_alloc(rings_at + rings_bytes);
  if (!mem.ok()) return Status{ENOMEM, "localdevice: " + mem.status().to_string()};
  auto* base = static_cast<uint8_t*>(*mem);
  local::Table t{};
  t.magic = local::kTableMagic;
  t.max_sockets = options.max_sockets;
  t.ring_bytes = options.ring_bytes;
  t.sockets = reinterpret_cast<local::Socket*>(base + sockets_at);
  t.ports = reinterpret_cast<uint32_t*>(base + ports_at);
  t.rings = base + rings_at;
  Status s = rt.copy_to_device(base + table_at, &t, sizeof t);
  if (s.ok()) s = rt.set_module_state(local::kModuleIndex, base + table_at);
  if (!s.ok()) {
    rt.device_free(base);
    return s;
  }
  // Kernels may hold descriptors until they end; the memory goes with the runtime.
  rt.device_free_at_exit(base);
  return std::make_shared<LocalDevice>(rt, base + table_at, options);
}

Result<LocalDeviceSnapshot> LocalDevice::snapshot() const {
  local::Table t{};
  Status s = rt_.copy_from_device(&t, table_, sizeof t);
  if (!s.ok()) return s;
  std::vector<local::Socket> socks(t.max_sockets);
  s = rt_.copy_from_device(socks.data(), t.sockets, socks.size() * sizeof(local::Socket));
  if (!s.ok()) return s;
  LocalDeviceSnapshot snap;
  snap.max_sockets = t.max_sockets;
  snap.ring_bytes = t.ring_bytes;
  for (uint32_t i = 0; i < t.max_sockets; ++i) {
    const local::Socket& k = socks[i];
    const uint32_t refs = static_cast<uint32_t>(k.life);
    if (refs == 0 || k.state == local::kFree) continue;
    LocalSocketInfo info;
    info.index = i;
    info.generation = static_cast<uint32_t>(k.life >> 32);
    info.type = static_cast<int>(k.type);
    info.state = state_name(k.state);
    info.closed = k.fd_state == local::kFdClosed;
    info.fd = k.fd_state == local::kFdOpen ? local::make_fd(i, info.generation) : -1;
    info.port = k.port;
    info.peer_port = k.peer_port;
    info.queued = k.tail - k.head;
    info.backlog = k.backlog;
    info.bytes_in = k.bytes_in;
    info.bytes_out = k.bytes_out;
    if (k.state == local::kListening) {
      ++snap.listeners;
    } else {
      snap.queued_bytes += info.queued;
      if (k.state == local::kConnected && k.type == SOCK_STREAM) ++snap.connected;
    }
    snap.sockets.push_back(std::move(info));
  }
  return snap;
}

Result<ResolvedAddress> resolve_address(std::string_view text) {
  ResolvedAddress out;
  const std::string str(text);
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
