// gpusock/net/socket.hpp — POSIX sockets for kernels (and for the same code on the cpu
// device). The host serves them through the backend the runtime was given (io_uring).
//
//   int fd = gpusock::socket(AF_INET, SOCK_STREAM, 0);
//   sockaddr_in a{};
//   a.sin_family = AF_INET;
//   a.sin_port = gpusock::htons(8080);
//   gpusock::inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
//   if (gpusock::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) < 0) {
//     int e = gpusock::errno_value();            // this lane's errno; lanes never share it
//   }
//   gpusock::send(fd, "ping", 4, 0);
//   char buf[64];
//   int64_t n = gpusock::recv(fd, buf, sizeof buf, 0);
//   gpusock::close(fd);
//
// Every function is per thread (lane), as in POSIX: divergent lanes each make their own
// call. Lanes of a warp that make the same call together share one hostcall (one slot,
// one round trip), each lane on its own descriptor with its own arguments.
//
// Three layers: gpusock::raw:: returns -errno (the io_uring convention, no hidden state);
// gpusock:: returns -1 and sets errno_value(); tcp.hpp has RAII types with
// expected-style results.
//
// Data never streams through the slots: send() copies the bytes into staging pages in
// pinned host memory (the lanes of a warp copy together, coalesced), and the host sends
// from there; recv() copies out of a receive buffer the host lent, in the same pinned
// memory, and gives it back. A full staging arena makes send() wait (backpressure); no
// byte is dropped.
#pragma once

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdint>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/io.hpp"
#include "gpusock/net/inet.hpp"
#include "gpusock/net/localdevice.hpp"
#include "gpusock/net/protocol.hpp"

namespace gpusock {

namespace net::internal {

// Bytes of one send() piece: a whole piece goes in one call, so a datagram up to this size
// keeps its boundary. Larger stream sends go in pieces of this size.
inline constexpr uint32_t kMaxSendPiece = hostcall::kStagingMaxRun * hostcall::kStagingPageBytes;

GPUSOCK_HD inline void words_from_bytes(const void* src, uint32_t n, uint64_t* w, uint32_t nwords) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  for (uint32_t k = 0; k < nwords; ++k) {
    uint64_t v = 0;
    for (uint32_t b = 0; b < 8; ++b) {
      uint32_t i = k * 8 + b;
      if (i < n) v |= static_cast<uint64_t>(p[i]) << (8 * b);
    }
    w[k] = v;
  }
}

// Copies an address the host sent in result words into a caller's (addr, *len), POSIX
// style: at most *len bytes are written, and *len becomes the address's full length.
GPUSOCK_HD inline void addr_to_caller(const uint64_t* w, uint32_t actual, sockaddr* addr, socklen_t* len) {
  if (addr == nullptr || len == nullptr) return;
  if (actual > kMaxAddrBytes) actual = kMaxAddrBytes;
  uint8_t* p = reinterpret_cast<uint8_t*>(addr);
  const uint32_t room = *len;
  for (uint32_t i = 0; i < actual && i < room; ++i) p[i] = static_cast<uint8_t>(w[i / 8] >> (8 * (i % 8)));
  *len = actual;
}

// getsockname/getpeername: one address back in result words 1..5.
GPUSOCK_HD inline int name_call(uint32_t opcode, int fd, sockaddr* addr, socklen_t* len) {
  if (addr == nullptr || len == nullptr) return -EFAULT;
  uint64_t r[5];
  int64_t ret = hostcall::wait(hostcall::submit(opcode, fd), r, 5);
  if (ret >= 0) addr_to_caller(r + 1, static_cast<uint32_t>(r[0]), addr, len);
  return static_cast<int>(ret);
}

// A receive's dst word (protocol.hpp kRecv): the buffer's address when the host could
// copy into it, 0 when it cannot be (a GPU's local or shared memory). The host checks the
// rest: it delivers only into device_alloc() memory (Runtime::deliver()).
GPUSOCK_HD inline uint64_t deliver_to(const void* p) {
#if defined(__CUDA_ARCH__)
  if (!__isGlobal(p)) return 0;
#endif
  return reinterpret_cast<uint64_t>(p);
}

GPUSOCK_HD inline int64_t posix(int64_t r) {
  if (r < 0) {
    hostcall::errno_ref() = static_cast<int32_t>(-r);
    return -1;
  }
  return r;
}

// After a setsockopt(kSoPollOnDevice) the host accepted: from now on poll() reads the
// readiness words. Setting it for a value of 0 too costs only that read.
GPUSOCK_HD inline void note_poll_on_device() {
  const ReadyHead* h = static_cast<const ReadyHead*>(hostcall::module_head(kReadyModule));
  if (h->in_use != nullptr) AtomicRef<uint32_t, Scope::kDevice>(*h->in_use).store(1, Order::kRelaxed);
}

}  // namespace net::internal

namespace raw {

// Each returns what its POSIX namesake returns on success, or -errno.

// domain AF_INET or AF_INET6; type SOCK_STREAM or SOCK_DGRAM, optionally | SOCK_NONBLOCK
// | SOCK_CLOEXEC. Returns a descriptor, or -EAFNOSUPPORT, -EPROTONOSUPPORT, -EINVAL,
// -EMFILE (the runtime's socket limit or the process's), -ESHUTDOWN.
GPUSOCK_HD inline int socket(int domain, int type, int protocol) {
  if (domain == AF_LOCALDEVICE) return protocol == 0 ? net::local::socket(type) : -EPROTONOSUPPORT;
  return static_cast<int>(hostcall::call(net::op::kSocket, domain, type, protocol));
}

// Returns 0, or -EINVAL (bad length), -EFAULT (null address), -EADDRINUSE, -EBADF, ...
GPUSOCK_HD inline int bind(int fd, const sockaddr* addr, socklen_t len) {
  if (addr == nullptr) return -EFAULT;
  if (len > sizeof(sockaddr_storage)) return -EINVAL;
  if (net::local::is_local_fd(fd)) return net::local::bind(fd, addr, len);
  return static_cast<int>(hostcall::wait(hostcall::submit_with_payload(net::op::kBind, addr, len, fd)));
}

GPUSOCK_HD inline int listen(int fd, int backlog) {
  if (net::local::is_local_fd(fd)) return net::local::listen(fd, backlog);
  return static_cast<int>(hostcall::call(net::op::kListen, fd, backlog));
}

// Returns the new descriptor; fills (addr, *len) with the peer's address when both are
// given. -EAGAIN on a non-blocking listener with nothing pending; -EINVAL if fd is not
// listening; -EBADF if fd is closed while waiting.
GPUSOCK_HD inline int accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  uint64_t r[5];
  if (net::local::is_local_fd(fd)) return net::local::accept4(fd, addr, len, flags);
  int64_t ret;
  do {  // kAskAgain: the host let this lane go so the rest of its call could go on
    ret = hostcall::wait(hostcall::submit(net::op::kAccept, fd, flags), r, 5);
  } while (ret == net::kAskAgain);
  if (ret >= 0) net::internal::addr_to_caller(r + 1, static_cast<uint32_t>(r[0]), addr, len);
  return static_cast<int>(ret);
}
GPUSOCK_HD inline int accept(int fd, sockaddr* addr, socklen_t* len) { return raw::accept4(fd, addr, len, 0); }

// Blocking: returns 0 once connected, or -ECONNREFUSED, -ETIMEDOUT, ... Non-blocking:
// -EINPROGRESS, then poll for POLLOUT and read SO_ERROR.
GPUSOCK_HD inline int connect(int fd, const sockaddr* addr, socklen_t len) {
  if (addr == nullptr) return -EFAULT;
  if (len > sizeof(sockaddr_storage)) return -EINVAL;
  if (net::local::is_local_fd(fd)) return net::local::connect(fd, addr, len);
  return static_cast<int>(hostcall::wait(hostcall::submit_with_payload(net::op::kConnect, addr, len, fd)));
}

// Returns bytes sent. A blocking stream send returns only when every byte is handed to
// the kernel (or an error ends it: then the bytes sent so far, or -errno if none). A
// non-blocking one (MSG_DONTWAIT or O_NONBLOCK) may send part, or give -EAGAIN. Flags:
// MSG_DONTWAIT, MSG_MORE, MSG_OOB; MSG_NOSIGNAL is always on (no SIGPIPE ever: -EPIPE).
GPUSOCK_HD inline int64_t sendto(int fd, const void* buf, uint64_t len, int flags, const sockaddr* dest,
                                 socklen_t dest_len) {
  if (len > 0 && buf == nullptr) return -EFAULT;
  if (net::local::is_local_fd(fd)) return net::local::sendto(fd, buf, len, flags, dest, dest_len);
  uint64_t a[net::kMaxAddrBytes / 8] = {};
  if (dest == nullptr) {
    dest_len = 0;
  } else {
    if (dest_len == 0 || dest_len > net::kMaxAddrBytes) return -EINVAL;
    net::internal::words_from_bytes(dest, dest_len, a, 4);
  }
  const uint64_t fl = static_cast<uint32_t>(flags) | (static_cast<uint64_t>(dest_len) << 32);
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  uint64_t done = 0;
  // Every lane makes at least one call, so a zero-length send still reports EBADF etc.
  do {
    const uint64_t left = len - done;
    const uint32_t piece = left < net::internal::kMaxSendPiece ? static_cast<uint32_t>(left)
                                                                : net::internal::kMaxSendPiece;
    int64_t r = hostcall::wait(
        hostcall::submit_with_payload(net::op::kSend, p + done, piece, fd, fl, a[0], a[1], a[2], a[3]));
    // The host let this lane go so the rest of its call could go on (protocol.hpp): with
    // nothing sent (kAskAgain), or with part of the piece sent (| kSendMore).
    if (r == net::kAskAgain) continue;
    const bool more = r > 0 && (r & net::kSendMore) != 0;
    r &= ~(more ? net::kSendMore : 0);
    if (r < 0) return done > 0 ? static_cast<int64_t>(done) : r;
    done += static_cast<uint64_t>(r);
    if (!more && static_cast<uint64_t>(r) < piece) break;  // non-blocking: the socket buffer is full
  } while (done < len);
  return static_cast<int64_t>(done);
}
GPUSOCK_HD inline int64_t send(int fd, const void* buf, uint64_t len, int flags) {
  return raw::sendto(fd, buf, len, flags, nullptr, 0);
}

// Returns bytes received, 0 at end of stream, or -errno. One call returns at most one
// receive buffer's worth (NetOptions::recv_buffer_bytes, 64 KiB by default) unless
// MSG_WAITALL asks for all `len` on a stream. Flags: MSG_DONTWAIT, MSG_PEEK, MSG_WAITALL,
// MSG_TRUNC. (src, *src_len) receive a datagram's source address.
GPUSOCK_HD inline int64_t recvfrom(int fd, void* buf, uint64_t len, int flags, sockaddr* src, socklen_t* src_len) {
  if (len > 0 && buf == nullptr) return -EFAULT;
  if (net::local::is_local_fd(fd)) return net::local::recvfrom(fd, buf, len, flags, src, src_len);
  uint8_t* p = static_cast<uint8_t*>(buf);
  uint64_t done = 0;
  uint32_t retries = 0;
  bool again = false;
  for (;;) {
    const uint64_t left = len - done;
    const uint32_t want = left < 0xffffffffull ? static_cast<uint32_t>(left) : 0xffffffffu;
    uint64_t r[7];
    // A second ask (after a partial MSG_WAITALL answer or -ENOBUFS) goes in a call of its
    // own kind: sharing one with other lanes' first recvs could make it wait for a
    // blocking recv whose data depends on this lane's progress.
    const uint64_t group = net::op::kRecv | (again ? uint64_t{1} << 32 : 0);
    hostcall::Ticket t = hostcall::submit_grouped(group, net::op::kRecv, fd, flags, want, net::internal::deliver_to(p + done));
    again = true;
    int64_t n = hostcall::wait(t, r, 7);
    // kDelivered: the host copied the bytes into p + done itself (by DMA on a GPU).
    const bool delivered = n > 0 && (r[2] & net::kDelivered) != 0;
    uint8_t* data = n > 0 && !delivered ? reinterpret_cast<uint8_t*>(r[0]) : nullptr;
    const uint32_t take = data != nullptr ? static_cast<uint32_t>(n < static_cast<int64_t>(want) ? n : want) : 0;
    // The lanes that asked together copy together; each lane's bytes come from its buffer.
    hostcall::internal::group_copy(t.mask, p + done, data, take, true);
    if (data != nullptr) {
      // Give the buffer back. Release, system scope: every lane's loads from it (the
      // group copied together; the warp barrier in group_copy orders them) happen before
      // the host can see the flag and hand the buffer to the kernel's network stack again.
      AtomicRef<uint32_t, Scope::kSystem>(*reinterpret_cast<uint32_t*>(r[1])).store(0, Order::kRelease);
    }
    if (n == net::kAskAgain) continue;  // let go so the rest of its call could go on
    if (n == -ENOBUFS) {
      // The host had no free receive buffer (those lent to this call's other lanes have
      // just been given back above): ask again. Ends when a buffer frees, or with the
      // runtime's -ESHUTDOWN.
      spin_pause(retries++);
      continue;
    }
    if (n < 0) return done > 0 ? static_cast<int64_t>(done) : n;
    if (done == 0) net::internal::addr_to_caller(r + 3, static_cast<uint32_t>(r[2]), src, src_len);
    done += static_cast<uint64_t>(n);
    // MSG_WAITALL: a stream keeps reading until len bytes, end of stream or an error (the
    // host says whether the socket is a stream in bit 32 of the address-length word).
    const bool stream = ((r[2] >> 32) & 1u) != 0;
    if (n == 0 || done >= len || !stream || (flags & MSG_WAITALL) == 0 || (flags & MSG_PEEK) != 0) break;
  }
  return static_cast<int64_t>(done);
}
GPUSOCK_HD inline int64_t recv(int fd, void* buf, uint64_t len, int flags) {
  return raw::recvfrom(fd, buf, len, flags, nullptr, nullptr);
}

// read()/write() on a socket descriptor: recv()/send() with no flags. (write() on 1 and 2
// stays the host's stdout/stderr: io.hpp.)
GPUSOCK_HD inline int64_t read(int fd, void* buf, uint64_t len) { return raw::recv(fd, buf, len, 0); }

GPUSOCK_HD inline int shutdown(int fd, int how) {
  if (net::local::is_local_fd(fd)) return net::local::shutdown(fd, how);
  return static_cast<int>(hostcall::call(net::op::kShutdown, fd, how));
}

// Returns 0 or -EBADF. Calls other lanes are waiting in on fd (accept, recv, send, poll of
// the io_uring backend) end with -EBADF.
GPUSOCK_HD inline int close(int fd) {
  if (net::local::is_local_fd(fd)) return net::local::close(fd);
  return static_cast<int>(hostcall::call(net::op::kClose, fd));
}

// Options: SOL_SOCKET SO_REUSEADDR, SO_REUSEPORT, SO_KEEPALIVE, SO_RCVBUF, SO_SNDBUF,
// SO_LINGER, SO_BROADCAST, SO_RCVLOWAT, SO_PRIORITY, SO_OOBINLINE, SO_ERROR/SO_TYPE/
// SO_ACCEPTCONN/SO_DOMAIN/SO_PROTOCOL (get only); IPPROTO_TCP TCP_NODELAY, TCP_CORK,
// TCP_QUICKACK, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT, TCP_MAXSEG;
// IPPROTO_IP IP_TOS, IP_TTL; IPPROTO_IPV6 IPV6_V6ONLY, IPV6_UNICAST_HOPS. Others:
// -ENOPROTOOPT. Values up to 32 bytes.
GPUSOCK_HD inline int setsockopt(int fd, int level, int name, const void* value, socklen_t len) {
  if (net::local::is_local_fd(fd)) return net::local::setsockopt(fd, level, name, value, len);
  if (len > 0 && value == nullptr) return -EFAULT;
  if (len > net::kMaxOptBytes) return -EINVAL;
  const int r = static_cast<int>(
      hostcall::wait(hostcall::submit_with_payload(net::op::kSetsockopt, value, len, fd, level, name)));
  if (r == 0 && level == net::kSolGpusock && name == net::kSoPollOnDevice) net::internal::note_poll_on_device();
  return r;
}
GPUSOCK_HD inline int getsockopt(int fd, int level, int name, void* value, socklen_t* len) {
  if (value == nullptr || len == nullptr) return -EFAULT;
  if (net::local::is_local_fd(fd)) return net::local::getsockopt(fd, level, name, value, len);
  uint64_t r[5];
  int64_t ret = hostcall::wait(hostcall::submit(net::op::kGetsockopt, fd, level, name, *len), r, 5);
  if (ret >= 0) {
    uint8_t* p = static_cast<uint8_t*>(value);
    const uint32_t n = static_cast<uint32_t>(r[0]) < *len ? static_cast<uint32_t>(r[0]) : *len;
    for (uint32_t i = 0; i < n && i < net::kMaxOptBytes; ++i) p[i] = static_cast<uint8_t>(r[1 + i / 8] >> (8 * (i % 8)));
    *len = n;
  }
  return static_cast<int>(ret);
}

GPUSOCK_HD inline int getsockname(int fd, sockaddr* addr, socklen_t* len) {
  if (net::local::is_local_fd(fd)) return net::local::getsockname(fd, addr, len);
  return net::internal::name_call(net::op::kGetsockname, fd, addr, len);
}
GPUSOCK_HD inline int getpeername(int fd, sockaddr* addr, socklen_t* len) {
  if (net::local::is_local_fd(fd)) return net::local::getpeername(fd, addr, len);
  return net::internal::name_call(net::op::kGetpeername, fd, addr, len);
}

}  // namespace raw

namespace net::internal {
// poll() of host sockets: one hostcall (and one more each time the host lets the lane go).
GPUSOCK_HD inline int host_poll(pollfd* fds, uint32_t nfds, int timeout_ms) {
  const uint64_t start = timeout_ms > 0 ? globaltimer_ns() : 0;
  int left_ms = timeout_ms;
  for (;;) {
    hostcall::Ticket t = hostcall::submit_with_payload(net::op::kPoll, fds, nfds * sizeof(pollfd), nfds, left_ms);
    int64_t r = hostcall::wait_keep_staging(t);
    // The host wrote revents into this lane's copy of the array; bring it back (fd and
    // events come back unchanged).
    const uint32_t back = (r >= 0 && t.slot != hostcall::kNoSlot) ? nfds * static_cast<uint32_t>(sizeof(pollfd)) : 0;
    hostcall::internal::group_copy(t.mask, reinterpret_cast<uint8_t*>(fds), back ? hostcall::payload_view(t) : nullptr, back, true);
    hostcall::release(t);
    if (r != net::kAskAgain) return static_cast<int>(r);
    // Let go so the rest of its call could go on: poll again for what is left of the time.
    if (timeout_ms > 0) {
      const uint64_t waited_ms = (globaltimer_ns() - start) / 1000000u;
      left_ms = waited_ms >= static_cast<uint64_t>(timeout_ms) ? 0 : timeout_ms - static_cast<int>(waited_ms);
    }
  }
}


// Sets the revents of every localdevice entry; returns how many are non-zero.
GPUSOCK_HD inline int local_poll_pass(pollfd* fds, uint32_t nfds) {
  int ready = 0;
  for (uint32_t i = 0; i < nfds; ++i) {
    if (fds[i].fd < 0) fds[i].revents = 0;
    if (!local::is_local_fd(fds[i].fd)) continue;
    fds[i].revents = local::poll_events(fds[i].fd, fds[i].events);
    ready += fds[i].revents != 0;
  }
  return ready;
}

// ---- poll() on the device (kSoPollOnDevice, docs 12.9a) ----

// The backend's readiness words, or null when it keeps none or no socket was ever
// polled on the device (ReadyHead::in_use, a device-memory load): then a poll goes
// straight to the host without reading a word across the bus.
GPUSOCK_HD inline const ReadyHead* ready_head() {
  const ReadyHead* h = static_cast<const ReadyHead*>(hostcall::module_head(kReadyModule));
  if (h->words == nullptr) return nullptr;
  return AtomicRef<uint32_t, Scope::kDevice>(*h->in_use).load(Order::kRelaxed) != 0 ? h : nullptr;
}

// How many entries are localdevice descriptors and how many host sockets (negative
// descriptors are neither).
GPUSOCK_HD inline void count_fds(const pollfd* fds, uint32_t nfds, uint32_t& local, uint32_t& host_fds) {
  local = host_fds = 0;
  for (uint32_t i = 0; i < nfds; ++i) {
    local += local::is_local_fd(fds[i].fd) ? 1u : 0u;
    host_fds += (fds[i].fd >= 0 && !local::is_local_fd(fds[i].fd)) ? 1u : 0u;
  }
}

// Events a readiness word answers; an entry asking for anything else (POLLOUT) goes to
// the host.
inline constexpr short kWordEvents = POLLIN | POLLRDNORM | POLLPRI | POLLRDHUP;

// A pollfd entry's revents from its socket's readiness word.
GPUSOCK_HD inline short word_revents(uint32_t word, short events) {
  short r = static_cast<short>(word & (POLLERR | POLLHUP));
  if ((word & POLLIN) != 0) r |= static_cast<short>(events & (POLLIN | POLLRDNORM));
  r |= static_cast<short>(word & static_cast<uint32_t>(events & (POLLPRI | POLLRDHUP)));
  return r;
}

// One look at entries first, first + stride, ... on the device: negative descriptors,
// localdevice ones, and host sockets polled on the device. Sets their revents and returns
// how many are ready, or -1 when one of them is a host socket the device cannot answer
// for (not polled on the device, or asking for POLLOUT); revents are then unreliable.
// The words are read eight at a time, so eight PCIe reads are in flight at once.
GPUSOCK_HD inline int device_pass(pollfd* fds, uint32_t nfds, uint32_t first, uint32_t stride, const ReadyHead* h) {
  int ready = 0;
  constexpr uint32_t kBatch = 8;
  for (uint32_t i0 = first; i0 < nfds; i0 += kBatch * stride) {
    uint32_t word[kBatch];
#if GPUSOCK_IS_GPU
#pragma unroll
#endif
    for (uint32_t k = 0; k < kBatch; ++k) {
      const uint32_t i = i0 + k * stride;
      const int fd = i < nfds ? fds[i].fd : -1;
      word[k] = (h != nullptr && fd >= 0 && static_cast<uint32_t>(fd) < h->count)
                    ? AtomicRef<uint32_t, Scope::kSystem>(h->words[fd]).load(Order::kRelaxed)
                    : 0;
    }
    for (uint32_t k = 0; k < kBatch; ++k) {
      const uint32_t i = i0 + k * stride;
      if (i >= nfds) break;
      pollfd& p = fds[i];
      if (p.fd < 0) {
        p.revents = 0;
      } else if (local::is_local_fd(p.fd)) {
        p.revents = local::poll_events(p.fd, p.events);
      } else if ((word[k] & kReadyWatched) != 0 && (p.events & ~kWordEvents) == 0) {
        p.revents = word_revents(word[k], p.events);
      } else {
        return -1;
      }
      ready += p.revents != 0;
    }
  }
  return ready;
}

// r of device_poll(): the device cannot answer this poll; nothing was waited for.
inline constexpr int kPollNeedsHost = -(1 << 21);

// poll() answered on the device by one lane, while every entry is one the device can
// answer for. Returns the ready count, 0 on timeout, -ESHUTDOWN, -ECANCELED, or
// kPollNeedsHost.
GPUSOCK_HD inline int device_poll(pollfd* fds, uint32_t nfds, int timeout_ms, const ReadyHead* h, uint64_t start) {
  for (uint32_t i = 0;; ++i) {
    const int ready = device_pass(fds, nfds, 0, 1, h);
    if (ready != 0) return ready < 0 ? kPollNeedsHost : ready;
    if (timeout_ms >= 0 && globaltimer_ns() - start >= static_cast<uint64_t>(timeout_ms) * 1000000u) return 0;
    if ((i & 4095) == 4095 && hostcall::internal::shutting_down(hostcall::context())) return -ESHUTDOWN;
    if ((i & 63) == 63 && gpusock::internal::lane_waits_end()) return -ECANCELED;
    spin_pause(i);
  }
}

// What is left of timeout_ms since `start` (negative: no limit).
GPUSOCK_HD inline int poll_left_ms(int timeout_ms, uint64_t start) {
  if (timeout_ms < 0) return timeout_ms;
  const uint64_t waited_ms = (globaltimer_ns() - start) / 1000000u;
  return waited_ms >= static_cast<uint64_t>(timeout_ms) ? 0 : timeout_ms - static_cast<int>(waited_ms);
}

// poll() where the host takes part: `local` and `host_fds` count the localdevice entries
// and the host sockets (negative descriptors are neither).
GPUSOCK_HD inline int poll_through_host(pollfd* fds, uint32_t nfds, int timeout_ms, uint32_t local, uint32_t host_fds) {
  if (local == 0) return net::internal::host_poll(fds, nfds, timeout_ms);
  const bool host = host_fds > 0;
  const uint64_t start = globaltimer_ns();
  for (uint32_t i = 0;; ++i) {
    int ready = net::internal::local_poll_pass(fds, nfds);
    const int64_t left_ms =
        timeout_ms < 0 ? 1 : timeout_ms - static_cast<int64_t>((globaltimer_ns() - start) / 1000000u);
    if (host) {
      const int slice = (ready > 0 || left_ms <= 0) ? 0 : 1;
      const int r = net::internal::host_poll(fds, nfds, slice);
      if (r < 0) return r;
      // The host's answer brought back the localdevice entries as it left them (0).
      ready = r + net::internal::local_poll_pass(fds, nfds);
    }
    if (ready > 0 || (timeout_ms >= 0 && left_ms <= 0)) return ready;
    if (!host) {
      // The flag is in host memory (a PCIe read): look every 4096th pass, about 1 ms.
      if ((i & 4095) == 4095 && hostcall::internal::shutting_down(hostcall::context())) return -ESHUTDOWN;
      if ((i & 63) == 63 && gpusock::internal::lane_waits_end()) return -ECANCELED;
      spin_pause(i);
    }
  }
}

}  // namespace net::internal

namespace raw {

// Returns how many entries have revents != 0 (each entry's revents is set), 0 on
// timeout, or -errno. timeout_ms < 0 waits without limit. Descriptors that are not this
// runtime's sockets get POLLNVAL; negative ones are ignored. At most kMaxPollFds entries.
//
// localdevice descriptors, and host sockets with kSoPollOnDevice asking for POLLIN,
// POLLPRI or POLLRDHUP, are polled on the device: no hostcall while every entry is one of
// those (the readiness words of docs 12.9a). Otherwise a mix of localdevice and host
// sockets alternates: a host poll of at most 1 ms (0
// once a localdevice entry is ready), then a device pass; so a host socket's event ends
// the wait at once and a localdevice event within about 1 ms.
GPUSOCK_HD inline int poll(pollfd* fds, uint32_t nfds, int timeout_ms) {
  if (nfds > net::kMaxPollFds) return -EINVAL;
  if (nfds > 0 && fds == nullptr) return -EFAULT;
  uint32_t local = 0, host_fds = 0;
  net::internal::count_fds(fds, nfds, local, host_fds);
  if (host_fds > 0) {
    // Host sockets polled on the device (kSoPollOnDevice): no hostcall while every entry
    // is one of those, a localdevice descriptor or negative.
    if (const net::ReadyHead* h = net::internal::ready_head()) {
      const uint64_t start = globaltimer_ns();
      const int r = net::internal::device_poll(fds, nfds, timeout_ms, h, start);
      if (r != net::internal::kPollNeedsHost) return r;
      timeout_ms = net::internal::poll_left_ms(timeout_ms, start);
    }
  }
  return net::internal::poll_through_host(fds, nfds, timeout_ms, local, host_fds);
}

// F_GETFL (returns O_RDWR | O_NONBLOCK when set) and F_SETFL (O_NONBLOCK is honoured;
// other flags are ignored, as on Linux for sockets). Others: -EINVAL.
GPUSOCK_HD inline int fcntl(int fd, int cmd, int arg = 0) {
  if (net::local::is_local_fd(fd)) return net::local::fcntl(fd, cmd, arg);
  return static_cast<int>(hostcall::call(net::op::kFcntl, fd, cmd, arg));
}

// Warp-collective send, in the shape of CUDA's *_sync intrinsics: every lane in `mask`
// calls it with the same (fd, buf, len, flags), and `mask` names exactly those lanes. The
// bytes go out once, copied into staging by the lanes together (coalesced 16-byte stores),
// which is what makes one warp's bulk sends fast. Returns what send() returns, to every
// lane of mask. Streams only: on a datagram socket use send().
//
// A blocking send of at least net::kPullMinBytes from global memory is first offered to
// the host to take from where it is (kPullSource): when buf is device_alloc() or
// registered memory (Runtime::register_device_memory) the host copies it out by DMA,
// piece after piece while it sends the pieces before, and the warp copies nothing (docs
// 12.4, send step 2a). Otherwise the host answers kCopyInstead and the call goes on
// through staging, as a shorter or non-blocking send does.
//
// The mask is explicit because "the lanes that arrive together" is not a group a
// collective can rely on: lanes that reach the call apart (a slow lane on the cpu device, a
// divergent branch on a GPU) would otherwise form two groups with two leaders, and two
// leaders would each send the buffer.
GPUSOCK_HD inline int64_t warp_send(uint32_t mask, int fd, const void* buf, uint64_t len, int flags) {
  if (net::local::is_local_fd(fd)) return net::local::warp_send(mask, fd, buf, len, flags);
  const uint32_t leader = warp::leader(mask);
  const bool lead = warp::lane_id() == leader;
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  uint64_t done = 0;
  int64_t result = 0;
#if defined(__CUDA_ARCH__)
  bool pull = (flags & MSG_DONTWAIT) == 0 && __isGlobal(buf);
#else
  bool pull = (flags & MSG_DONTWAIT) == 0;
#endif
  for (;;) {
    const uint64_t left = len - done;
    uint64_t piece = 0;
    int64_t r = 0;
    if (pull && left >= net::kPullMinBytes) {
      piece = left < net::kPullMaxBytes ? left : net::kPullMaxBytes;
      if (lead) {
        const uint64_t fl = static_cast<uint32_t>(flags) | (uint64_t{net::kPullSource} << 32);
        r = hostcall::wait(hostcall::submit(net::op::kSend, fd, fl, reinterpret_cast<uint64_t>(p + done), piece));
      }
      r = warp::shfl(mask, r, leader);
      if (r == net::kCopyInstead) {
        pull = false;  // not memory the host takes from: through staging from here on
        continue;
      }
    } else {
      piece = left < net::internal::kMaxSendPiece ? left : net::internal::kMaxSendPiece;
      // Only the leader carries bytes; the others ride along with empty sends (answered at
      // once by the host, with no I/O) so that, when they share its hostcall, they join the
      // copy. Whichever calls the lanes end up in, only the leader's sends bytes.
      const uint64_t fl = static_cast<uint32_t>(flags) | (lead ? 0ull : (uint64_t{net::kRideAlong} << 32));
      r = hostcall::wait(hostcall::submit_with_payload(net::op::kSend, p + done, lead ? static_cast<uint32_t>(piece) : 0u,
                                                       fd, fl, 0, 0, 0, 0));
      r = warp::shfl(mask, r, leader);
    }
    if (r == net::kAskAgain) continue;  // let go with nothing sent (see sendto)
    const bool more = r > 0 && (r & net::kSendMore) != 0;
    r &= ~(more ? net::kSendMore : 0);
    if (r < 0) {
      result = done > 0 ? static_cast<int64_t>(done) : r;
      break;
    }
    done += static_cast<uint64_t>(r);
    result = static_cast<int64_t>(done);
    if ((!more && static_cast<uint64_t>(r) < piece) || done >= len) break;
  }
  return result;
}

// Warp-collective recv: every lane in `mask` calls it with the same (fd, buf, len, flags);
// one receive (MSG_WAITALL is ignored), its bytes copied out by the lanes together.
// Returns what recv() returns, to every lane of mask. See warp_send() for why the mask is
// explicit.
GPUSOCK_HD inline int64_t warp_recv(uint32_t mask, int fd, void* buf, uint64_t len, int flags) {
  if (net::local::is_local_fd(fd)) return net::local::warp_recv(mask, fd, buf, len, flags);
  const uint32_t leader = warp::leader(mask);
  // The other lanes ask for 0 bytes: the host answers them at once, with no I/O.
  int64_t r = raw::recvfrom(fd, buf, warp::lane_id() == leader ? len : 0, flags & ~MSG_WAITALL, nullptr, nullptr);
  return warp::shfl(mask, r, leader);
}

// Warp-collective poll(): every lane in `mask` calls it with the same (fds, nfds,
// timeout_ms), and `mask` names exactly those lanes; each gets poll()'s answer, and every
// entry's revents is set and seen by all of them. While the device can answer for every
// entry (kSoPollOnDevice sockets asking for POLLIN/POLLPRI/POLLRDHUP, localdevice
// descriptors, negative ones) the lanes share the entries, so one pass over 256 sockets
// is eight readiness-word reads per lane, in flight together; otherwise the leader makes
// poll()'s hostcall. `fds` must be memory every lane of mask can read and write (global
// or shared, not a lane's stack).
GPUSOCK_HD inline int warp_poll(uint32_t mask, pollfd* fds, uint32_t nfds, int timeout_ms) {
  if (nfds > net::kMaxPollFds) return -EINVAL;
  if (nfds > 0 && fds == nullptr) return -EFAULT;
  const uint32_t leader = warp::leader(mask);
  const uint32_t me = warp::lane_id();
  const net::ReadyHead* h = net::internal::ready_head();
  int r = net::internal::kPollNeedsHost;
  uint64_t start = 0;
  if (h != nullptr && nfds > 0) {
    start = warp::shfl(mask, globaltimer_ns(), leader);
    const uint32_t rank = popcount(mask & ((1u << me) - 1));
    const uint32_t width = popcount(mask);
    for (uint32_t i = 0;; ++i) {
      const int mine = net::internal::device_pass(fds, nfds, rank, width, h);
      if (warp::ballot(mask, mine < 0) != 0) break;  // r stays kPollNeedsHost
      uint32_t total = 0;
      warp::exclusive_sum(mask, static_cast<uint32_t>(mine), total);
      // The leader decides for all, so every lane leaves on the same pass.
      int verdict = 1;  // 1: go on
      if (me == leader) {
        if (total > 0) verdict = static_cast<int>(total) + 1;
        else if (timeout_ms >= 0 && globaltimer_ns() - start >= static_cast<uint64_t>(timeout_ms) * 1000000u) verdict = 0;
        else if ((i & 4095) == 4095 && hostcall::internal::shutting_down(hostcall::context())) verdict = -ESHUTDOWN;
        else if ((i & 63) == 63 && gpusock::internal::lane_waits_end()) verdict = -ECANCELED;
      }
      verdict = warp::shfl(mask, verdict, leader);
      if (verdict != 1) {
        r = verdict > 1 ? verdict - 1 : verdict;
        break;
      }
      spin_pause(i);
    }
  }
  if (r == net::internal::kPollNeedsHost) {
    if (me == leader) {
      uint32_t local = 0, host_fds = 0;
      net::internal::count_fds(fds, nfds, local, host_fds);
      const int left = h != nullptr && nfds > 0 ? net::internal::poll_left_ms(timeout_ms, start) : timeout_ms;
      r = net::internal::poll_through_host(fds, nfds, left, local, host_fds);
    }
    r = warp::shfl(mask, r, leader);
  }
  warp::sync(mask);  // every lane's revents stores are seen by the others
  return r;
}

}  // namespace raw

// POSIX shape: -1 and errno_value() on failure.
GPUSOCK_HD inline int socket(int domain, int type, int protocol) {
  return static_cast<int>(net::internal::posix(raw::socket(domain, type, protocol)));
}
GPUSOCK_HD inline int bind(int fd, const sockaddr* addr, socklen_t len) {
  return static_cast<int>(net::internal::posix(raw::bind(fd, addr, len)));
}
GPUSOCK_HD inline int listen(int fd, int backlog) { return static_cast<int>(net::internal::posix(raw::listen(fd, backlog))); }
GPUSOCK_HD inline int accept4(int fd, sockaddr* addr, socklen_t* len, int flags) {
  return static_cast<int>(net::internal::posix(raw::accept4(fd, addr, len, flags)));
}
GPUSOCK_HD inline int accept(int fd, sockaddr* addr, socklen_t* len) { return gpusock::accept4(fd, addr, len, 0); }
GPUSOCK_HD inline int connect(int fd, const sockaddr* addr, socklen_t len) {
  return static_cast<int>(net::internal::posix(raw::connect(fd, addr, len)));
}
GPUSOCK_HD inline int64_t sendto(int fd, const void* buf, uint64_t len, int flags, const sockaddr* dest,
                                 socklen_t dest_len) {
  return net::internal::posix(raw::sendto(fd, buf, len, flags, dest, dest_len));
}
GPUSOCK_HD inline int64_t send(int fd, const void* buf, uint64_t len, int flags) {
  return net::internal::posix(raw::send(fd, buf, len, flags));
}
GPUSOCK_HD inline int64_t recvfrom(int fd, void* buf, uint64_t len, int flags, sockaddr* src, socklen_t* src_len) {
  return net::internal::posix(raw::recvfrom(fd, buf, len, flags, src, src_len));
}
GPUSOCK_HD inline int64_t recv(int fd, void* buf, uint64_t len, int flags) {
  return net::internal::posix(raw::recv(fd, buf, len, flags));
}
GPUSOCK_HD inline int64_t read(int fd, void* buf, uint64_t len) { return net::internal::posix(raw::read(fd, buf, len)); }
GPUSOCK_HD inline int shutdown(int fd, int how) { return static_cast<int>(net::internal::posix(raw::shutdown(fd, how))); }
GPUSOCK_HD inline int close(int fd) { return static_cast<int>(net::internal::posix(raw::close(fd))); }
GPUSOCK_HD inline int setsockopt(int fd, int level, int name, const void* value, socklen_t len) {
  return static_cast<int>(net::internal::posix(raw::setsockopt(fd, level, name, value, len)));
}
GPUSOCK_HD inline int getsockopt(int fd, int level, int name, void* value, socklen_t* len) {
  return static_cast<int>(net::internal::posix(raw::getsockopt(fd, level, name, value, len)));
}
GPUSOCK_HD inline int getsockname(int fd, sockaddr* addr, socklen_t* len) {
  return static_cast<int>(net::internal::posix(raw::getsockname(fd, addr, len)));
}
GPUSOCK_HD inline int getpeername(int fd, sockaddr* addr, socklen_t* len) {
  return static_cast<int>(net::internal::posix(raw::getpeername(fd, addr, len)));
}
GPUSOCK_HD inline int poll(pollfd* fds, uint32_t nfds, int timeout_ms) {
  return static_cast<int>(net::internal::posix(raw::poll(fds, nfds, timeout_ms)));
}
GPUSOCK_HD inline int fcntl(int fd, int cmd, int arg = 0) {
  return static_cast<int>(net::internal::posix(raw::fcntl(fd, cmd, arg)));
}

}  // namespace gpusock
