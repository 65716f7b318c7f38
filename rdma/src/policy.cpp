#include "gpusock/rdma/policy.hpp"

#include <arpa/inet.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <sstream>

namespace gpusock::rdma {

const char* to_string(Transport t) {
  switch (t) {
    case Transport::kAuto: return "auto";
    case Transport::kTcp: return "tcp";
    case Transport::kRdma: return "rdma";
  }
  return "?";
}

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

bool parse_u32(std::string_view s, uint32_t max, uint32_t* out) {
  if (s.empty()) return false;
  uint32_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || v > max) return false;
  *out = v;
  return true;
}

bool parse_rule(std::string_view text, Rule* r) {
  std::vector<std::string_view> words;
  while (!(text = trim(text)).empty()) {
    size_t e = text.find_first_of(" \t");
    words.push_back(text.substr(0, e));
    text = e == std::string_view::npos ? std::string_view{} : text.substr(e);
  }
  if (words.size() < 2 || words.size() > 3) return false;
  if (words[0] == "rdma") r->transport = Transport::kRdma;
  else if (words[0] == "tcp") r->transport = Transport::kTcp;
  else return false;
  std::string_view where = words.back();
  if (words.size() == 3) {
    if (words[1] == "connect") r->direction = Direction::kConnect;
    else if (words[1] == "listen") r->direction = Direction::kListen;
    else if (words[1] == "any") r->direction = Direction::kAny;
    else return false;
  }
  std::string_view addr = where, ports;
  if (size_t c = where.rfind(':'); c != std::string_view::npos) {
    addr = where.substr(0, c);
    ports = where.substr(c + 1);
  }
  if (addr == "*") {
    r->any_address = true;
  } else {
    r->any_address = false;
    std::string_view ip = addr;
    uint32_t len = 32;
    if (size_t s = addr.find('/'); s != std::string_view::npos) {
      ip = addr.substr(0, s);
      if (!parse_u32(addr.substr(s + 1), 32, &len)) return false;
    }
    std::string ips(ip);
    in_addr a{};
    if (inet_pton(AF_INET, ips.c_str(), &a) != 1) return false;
    r->ipv4 = ntohl(a.s_addr);
    r->prefix_len = static_cast<uint8_t>(len);
  }
  if (!ports.empty()) {
    uint32_t lo = 0, hi = 0;
    if (size_t d = ports.find('-'); d != std::string_view::npos) {
      if (!parse_u32(ports.substr(0, d), 65535, &lo) || !parse_u32(ports.substr(d + 1), 65535, &hi) || lo > hi) {
        return false;
      }
    } else {
      if (!parse_u32(ports, 65535, &lo)) return false;
      hi = lo;
    }
    r->port_lo = static_cast<uint16_t>(lo);
    r->port_hi = static_cast<uint16_t>(hi);
  }
  return true;
}

}  // namespace

Result<Policy> Policy::parse(std::string_view text) {
  Policy p;
  while (!text.empty()) {
    size_t e = text.find_first_of(";\n");
    std::string_view one = trim(text.substr(0, e));
    text = e == std::string_view::npos ? std::string_view{} : text.substr(e + 1);
    if (one.empty() || one.front() == '#') continue;
    Rule r;
    if (!parse_rule(one, &r)) return Status(EINVAL, "rdma policy: cannot read rule \"" + std::string(one) + "\"");
    p.rules_.push_back(r);
  }
  return p;
}

Transport Policy::choose(const sockaddr* addr, socklen_t len, Direction dir) const {
  if (addr == nullptr) return Transport::kTcp;
  uint16_t port = 0;
  bool v4 = false;
  uint32_t ip = 0;
  if (addr->sa_family == AF_INET && len >= sizeof(sockaddr_in)) {
    auto* in = reinterpret_cast<const sockaddr_in*>(addr);
    port = ntohs(in->sin_port);
    ip = ntohl(in->sin_addr.s_addr);
    v4 = true;
  } else if (addr->sa_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(addr);
    port = ntohs(in6->sin6_port);
    if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
      std::memcpy(&ip, in6->sin6_addr.s6_addr + 12, 4);
      ip = ntohl(ip);
      v4 = true;
    }
  } else {
    return Transport::kTcp;
  }
  for (const Rule& r : rules_) {
    if (r.direction != Direction::kAny && r.direction != dir) continue;
    if (port < r.port_lo || port > r.port_hi) continue;
    if (!r.any_address) {
      if (!v4) continue;
      const uint32_t mask = r.prefix_len == 0 ? 0 : ~uint32_t{0} << (32 - r.prefix_len);
      if ((ip & mask) != (r.ipv4 & mask)) continue;
    }
    return r.transport;
  }
  return Transport::kTcp;
}

std::string Policy::to_string() const {
  std::ostringstream o;
  for (size_t i = 0; i < rules_.size(); ++i) {
    const Rule& r = rules_[i];
    if (i) o << "; ";
    o << rdma::to_string(r.transport) << ' '
      << (r.direction == Direction::kConnect ? "connect" : r.direction == Direction::kListen ? "listen" : "any") << ' ';
    if (r.any_address) {
      o << '*';
    } else {
      in_addr a{htonl(r.ipv4)};
      char buf[INET_ADDRSTRLEN];
      inet_ntop(AF_INET, &a, buf, sizeof buf);
      o << buf << '/' << int{r.prefix_len};
    }
    if (r.port_lo != 0 || r.port_hi != 65535) {
      o << ':' << r.port_lo;
      if (r.port_hi != r.port_lo) o << '-' << r.port_hi;
    }
  }
  return o.str();
}

}  // namespace gpusock::rdma
