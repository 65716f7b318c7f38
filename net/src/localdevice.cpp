// The host side of the localdevice family: the table in device memory and snapshots of it.
// The address resolver for configuration text is in address.cpp.
#include "gpusock/net/localdevice_host.hpp"

#include <vector>

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
  const uint64_t cursors_at = 128;  // zeroed with the rest of the allocation
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
  t.hand_off = options.hand_off ? 1 : 0;
  t.sockets = reinterpret_cast<local::Socket*>(base + sockets_at);
  t.ports = reinterpret_cast<uint32_t*>(base + ports_at);
  t.rings = base + rings_at;
  t.cursors = reinterpret_cast<local::Cursors*>(base + cursors_at);
  Status s = rt.copy_to_device(base + table_at, &t, sizeof t);
  if (s.ok()) s = rt.set_module_state(local::kModuleIndex, base + table_at, &t, sizeof t);
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
    info.queued = k.tail - local::detail::consumed(k.head);
    info.backlog = k.backlog;
    info.bytes_in = k.bytes_in;
    info.bytes_direct = k.bytes_direct;
    snap.direct_bytes += k.bytes_direct;
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

}  // namespace gpusock::net
