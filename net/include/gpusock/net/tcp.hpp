// gpusock/net/tcp.hpp — owning socket types for kernels: TcpListener, TcpStream,
// UdpSocket. Each owns its descriptor (closed by the destructor), is move-only, and
// returns Expected<T>: a value or an errno, never a hidden errno.
//
//   auto l = gpusock::TcpListener::bind(gpusock::SockAddr::ipv4(127, 0, 0, 1, 8080));
//   if (!l) return;                                  // l.error() is the errno
//   auto conn = l->accept();
//   char buf[256];
//   auto n = conn->recv(buf, sizeof buf);
//   if (n && *n > 0) conn->send_all(buf, *n);
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>

#include "gpusock/net/inet.hpp"
#include "gpusock/net/socket.hpp"

namespace gpusock {

// A value of T, or an errno (> 0).
template <typename T>
class Expected {
 public:
  GPUSOCK_HD Expected(T value) : value_(static_cast<T&&>(value)), error_(0) {}
  GPUSOCK_HD static Expected failure(int error) {
    Expected e{T{}};
    e.error_ = error;
    return e;
  }
  GPUSOCK_HD explicit operator bool() const { return error_ == 0; }
  GPUSOCK_HD bool ok() const { return error_ == 0; }
  GPUSOCK_HD int error() const { return error_; }
  GPUSOCK_HD T& operator*() { return value_; }
  GPUSOCK_HD T* operator->() { return &value_; }
  GPUSOCK_HD T& value() { return value_; }

 private:
  T value_;
  int error_;
};

// An IPv4 or IPv6 socket address, by value.
struct SockAddr {
  alignas(8) uint8_t bytes[net::kMaxAddrBytes] = {};
  socklen_t len = 0;

  GPUSOCK_HD static SockAddr ipv4(uint8_t a, uint8_t b, uint8_t c, uint8_t d, uint16_t port) {
    SockAddr s;
    auto* in = reinterpret_cast<sockaddr_in*>(s.bytes);
    in->sin_family = AF_INET;
    in->sin_port = htons(port);
    in->sin_addr.s_addr = htonl((uint32_t{a} << 24) | (uint32_t{b} << 16) | (uint32_t{c} << 8) | d);
    s.len = sizeof(sockaddr_in);
    return s;
  }
  // Parses "1.2.3.4" or "::1" (and friends) plus a port. Expected fails with EINVAL.
  GPUSOCK_HD static Expected<SockAddr> parse(const char* host, uint16_t port) {
    SockAddr s;
    auto* in = reinterpret_cast<sockaddr_in*>(s.bytes);
    if (raw::inet_pton(AF_INET, host, &in->sin_addr) == 1) {
      in->sin_family = AF_INET;
      in->sin_port = htons(port);
      s.len = sizeof(sockaddr_in);
      return s;
    }
    auto* in6 = reinterpret_cast<sockaddr_in6*>(s.bytes);
    if (raw::inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
      in6->sin6_family = AF_INET6;
      in6->sin6_port = htons(port);
      s.len = sizeof(sockaddr_in6);
      return s;
    }
    return Expected<SockAddr>::failure(EINVAL);
  }
  GPUSOCK_HD int family() const { return reinterpret_cast<const sockaddr*>(bytes)->sa_family; }
  GPUSOCK_HD uint16_t port() const { return ntohs(reinterpret_cast<const sockaddr_in*>(bytes)->sin_port); }
  GPUSOCK_HD const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(bytes); }
  GPUSOCK_HD sockaddr* get() { return reinterpret_cast<sockaddr*>(bytes); }
};

namespace net::internal {
// Owns a descriptor; the base of the three socket types.
class OwnedFd {
 public:
  GPUSOCK_HD OwnedFd() = default;
  GPUSOCK_HD explicit OwnedFd(int fd) : fd_(fd) {}
  GPUSOCK_HD OwnedFd(OwnedFd&& o) : fd_(o.fd_) { o.fd_ = -1; }
  GPUSOCK_HD OwnedFd& operator=(OwnedFd&& o) {
    if (this != &o) {
      reset();
      fd_ = o.fd_;
      o.fd_ = -1;
    }
    return *this;
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  // Holds the abort stop (LaneStopHold): a lane of an aborted launch that leaves a scope
  // normally still closes its descriptor here (and on the cpu device must not throw).
  GPUSOCK_HD ~OwnedFd() {
    LaneStopHold hold;
    reset();
  }
  GPUSOCK_HD int fd() const { return fd_; }
  // Closes now; returns 0 or the errno of close.
  GPUSOCK_HD int reset() {
    int r = fd_ >= 0 ? raw::close(fd_) : 0;
    fd_ = -1;
    return r < 0 ? -r : 0;
  }
  GPUSOCK_HD Expected<SockAddr> local_addr() const { return name(net::op::kGetsockname); }

 protected:
  GPUSOCK_HD Expected<SockAddr> name(uint32_t opcode) const {
    SockAddr a;
    a.len = sizeof a.bytes;
    int r = name_call(opcode, fd_, a.get(), &a.len);
    return r < 0 ? Expected<SockAddr>::failure(-r) : Expected<SockAddr>(a);
  }
  int fd_ = -1;
};

GPUSOCK_HD inline Expected<uint64_t> bytes(int64_t r) {
  return r < 0 ? Expected<uint64_t>::failure(static_cast<int>(-r)) : Expected<uint64_t>(static_cast<uint64_t>(r));
}
}  // namespace net::internal

class TcpStream : public net::internal::OwnedFd {
 public:
  GPUSOCK_HD TcpStream() = default;
  GPUSOCK_HD explicit TcpStream(int fd) : OwnedFd(fd) {}

  GPUSOCK_HD static Expected<TcpStream> connect(const SockAddr& to) {
    int fd = raw::socket(to.family(), SOCK_STREAM, 0);
    if (fd < 0) return Expected<TcpStream>::failure(-fd);
    TcpStream s(fd);
    int one = 1;
    raw::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = raw::connect(fd, to.get(), to.len);
    if (r < 0) return Expected<TcpStream>::failure(-r);
    return Expected<TcpStream>(static_cast<TcpStream&&>(s));
  }
  // Every byte, or the errno that stopped it.
  GPUSOCK_HD Expected<uint64_t> send_all(const void* buf, uint64_t n) { return net::internal::bytes(raw::send(fd_, buf, n, 0)); }
  // Up to n bytes; 0 at end of stream.
  GPUSOCK_HD Expected<uint64_t> recv(void* buf, uint64_t n, int flags = 0) {
    return net::internal::bytes(raw::recv(fd_, buf, n, flags));
  }
  // Exactly n bytes, or fewer at end of stream.
  GPUSOCK_HD Expected<uint64_t> recv_exact(void* buf, uint64_t n) {
    return net::internal::bytes(raw::recv(fd_, buf, n, MSG_WAITALL));
  }
  GPUSOCK_HD int shutdown_write() { return -raw::shutdown(fd_, SHUT_WR); }
  GPUSOCK_HD Expected<SockAddr> peer_addr() const { return name(net::op::kGetpeername); }
};

class TcpListener : public net::internal::OwnedFd {
 public:
  GPUSOCK_HD TcpListener() = default;
  GPUSOCK_HD explicit TcpListener(int fd) : OwnedFd(fd) {}

  // socket + SO_REUSEADDR + bind + listen. Port 0 picks one: see local_addr().
  GPUSOCK_HD static Expected<TcpListener> bind(const SockAddr& at, int backlog = 128) {
    int fd = raw::socket(at.family(), SOCK_STREAM, 0);
    if (fd < 0) return Expected<TcpListener>::failure(-fd);
    TcpListener l(fd);
    int one = 1;
    raw::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int r = raw::bind(fd, at.get(), at.len);
    if (r == 0) r = raw::listen(fd, backlog);
    if (r < 0) return Expected<TcpListener>::failure(-r);
    return Expected<TcpListener>(static_cast<TcpListener&&>(l));
  }
  GPUSOCK_HD Expected<TcpStream> accept() {
    int fd = raw::accept(fd_, nullptr, nullptr);
    if (fd < 0) return Expected<TcpStream>::failure(-fd);
    return Expected<TcpStream>(TcpStream(fd));
  }
};

class UdpSocket : public net::internal::OwnedFd {
 public:
  GPUSOCK_HD UdpSocket() = default;
  GPUSOCK_HD explicit UdpSocket(int fd) : OwnedFd(fd) {}

  GPUSOCK_HD static Expected<UdpSocket> bind(const SockAddr& at) {
    int fd = raw::socket(at.family(), SOCK_DGRAM, 0);
    if (fd < 0) return Expected<UdpSocket>::failure(-fd);
    UdpSocket u(fd);
    int r = raw::bind(fd, at.get(), at.len);
    if (r < 0) return Expected<UdpSocket>::failure(-r);
    return Expected<UdpSocket>(static_cast<UdpSocket&&>(u));
  }
  // One datagram.
  GPUSOCK_HD Expected<uint64_t> send_to(const void* buf, uint64_t n, const SockAddr& to) {
    return net::internal::bytes(raw::sendto(fd_, buf, n, 0, to.get(), to.len));
  }
  // One datagram; *from receives its source.
  GPUSOCK_HD Expected<uint64_t> recv_from(void* buf, uint64_t n, SockAddr* from) {
    socklen_t len = sizeof from->bytes;
    int64_t r = raw::recvfrom(fd_, buf, n, 0, from ? from->get() : nullptr, from ? &len : nullptr);
    if (r >= 0 && from != nullptr) from->len = len;
    return net::internal::bytes(r);
  }
};

}  // namespace gpusock
