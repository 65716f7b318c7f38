// gpusock/net/protocol.hpp — the socket hostcalls on the wire: opcodes, the argument
// words a lane sends and the result words the host answers. Shared by the device API
// (socket.hpp) and the host dispatcher (net/src/dispatch.cpp); a backend never sees it.
//
// Every call is per lane: a[k] is argument word k of the lane, r[k] result word k. r[0] is
// the POSIX return value or -errno. "payload" is a byte range the lane copied into the
// staging arena (hostcall::submit_with_payload), described by the two argument words
// that follow the listed ones. Addresses travel as their sockaddr bytes, at most
// kMaxAddrBytes (sockaddr_in6 is 28); where they come back in result words, word k holds
// bytes 8(k-first)..8(k-first)+7, little-endian.
//
// op           a[...]                               payload          r[...]
// kSocket      domain, type|flags, protocol         -                fd
// kBind        fd                                   sockaddr         0
// kListen      fd, backlog                          -                0
// kAccept      fd, flags (SOCK_NONBLOCK|CLOEXEC)    -                fd, addrlen, addr[4]
// kConnect     fd                                   sockaddr         0
// kSend        fd, flags|addrlen<<32, addr[4]       data             bytes sent
//                (addrlen 0: no destination; kRideAlong: a lane of warp_send() that
//                carries no bytes, answered 0 with no I/O)
//              fd, flags|kPullSource<<32, src, len  -                bytes sent
//                a warp_send() leader's bytes left where they are: `src` is their device
//                address. A backend that can (Backend::pulls()) copies them out of device
//                memory itself (Runtime::start_fetch(), only out of device_alloc() or
//                registered memory) and sends them; otherwise, or for memory it may
//                not read, it answers kCopyInstead and the lane copies through staging.
// kRecv        fd, flags, len, dst                  -                bytes, data, flag, addrlen, addr[4]
//                data: device address of the bytes (a receive buffer the host lent);
//                flag: device address of the buffer's 32-bit lent flag: the lane stores 0
//                there (release) once it has copied the bytes out, which gives the buffer
//                back. bytes <= 0: no buffer was lent (data = flag = 0).
//                dst: where the caller wants the bytes (0: not said). A backend may copy
//                them there itself (Runtime::deliver(), only into device_alloc() memory)
//                and say so with kDelivered in the addrlen word; then nothing is lent.
// kShutdown    fd, how                              -                0
// kClose       fd                                   -                0
// kSetsockopt  fd, level, optname                   optval           0
// kGetsockopt  fd, level, optname, optlen          -                0, optlen, value[4]
// kGetsockname fd                                   -                0, addrlen, addr[4]
// kGetpeername fd                                   -                0, addrlen, addr[4]
// kPoll        nfds, timeout_ms                     pollfd[nfds]     ready count; the host
//                writes each entry's revents back into the payload before it answers
// kFcntl       fd, cmd, arg                         -                value
//
// Lanes of one warp call are answered together (one slot, one reply), so a lane blocked
// in accept, recv, send or poll would hold back lanes of its call already answered, and
// deadlock where their progress is what it waits for (a client that connects again only
// after its first connection was served). The host therefore answers a lane still blocked
// some time after another lane of its call was answered (Backend::straggler_wait()) with
// kAskAgain, or a blocking stream send with the bytes it sent so far | kSendMore, and the
// lane asks again in a call of its own. Neither ever reaches the caller.
#pragma once

#include <cstdint>

#include "gpusock/hostcall/opcodes.hpp"

namespace gpusock::net {

namespace op {
inline constexpr uint32_t kFirst = 0x0100;
inline constexpr uint32_t kSocket = 0x0100;
inline constexpr uint32_t kBind = 0x0101;
inline constexpr uint32_t kListen = 0x0102;
inline constexpr uint32_t kAccept = 0x0103;
inline constexpr uint32_t kConnect = 0x0104;
inline constexpr uint32_t kSend = 0x0105;
inline constexpr uint32_t kRecv = 0x0106;
inline constexpr uint32_t kShutdown = 0x0107;
inline constexpr uint32_t kClose = 0x0108;
inline constexpr uint32_t kSetsockopt = 0x0109;
inline constexpr uint32_t kGetsockopt = 0x010a;
inline constexpr uint32_t kGetsockname = 0x010b;
inline constexpr uint32_t kGetpeername = 0x010c;
inline constexpr uint32_t kPoll = 0x010d;
inline constexpr uint32_t kFcntl = 0x010e;
inline constexpr uint32_t kLast = 0x010e;
static_assert(kFirst >= hostcall::kModuleFirst && kLast <= hostcall::kModuleLast);
}  // namespace op

// r[0] of a lane the host let go before its operation ended: nothing happened, ask again.
// Below every -errno (errno values are under 4096); fits an inline reply (32 bits).
inline constexpr int64_t kAskAgain = -(int64_t{1} << 20);
// kRecv's addrlen word: bit 32 says the socket is a stream; kDelivered says the bytes are
// already in the caller's buffer (dst), copied by the host, and no buffer was lent.
inline constexpr uint64_t kStreamBit = uint64_t{1} << 32;
inline constexpr uint64_t kDelivered = uint64_t{1} << 33;
// Or'ed into a blocking stream send's byte count when the host let the lane go before the
// last byte went: send the rest. Above any one send's size (internal::kMaxSendPiece).
inline constexpr int64_t kSendMore = int64_t{1} << 40;

// Largest address that travels in argument or result words (4 words).
inline constexpr uint32_t kMaxAddrBytes = 32;
// kSend's address length for a warp_send() lane that only helps copy.
inline constexpr uint32_t kRideAlong = 0xffff;
// kSend's address length for a send whose bytes the host is to take from device memory.
inline constexpr uint32_t kPullSource = 0xfffe;
// r[0] of a kPullSource send the host will not take from device memory: nothing was sent,
// copy the bytes into staging and send again. Below kAskAgain.
inline constexpr int64_t kCopyInstead = kAskAgain - 1;
// Least bytes a warp_send() asks the host to take from device memory (kPullSource); a
// shorter send is copied into staging by the warp.
inline constexpr uint64_t kPullMinBytes = 128 * 1024;
// Most bytes of one kPullSource call: a longer send goes in calls of this size.
inline constexpr uint64_t kPullMaxBytes = 64ull << 20;
// Largest option value getsockopt/setsockopt carry.
inline constexpr uint32_t kMaxOptBytes = 32;
// Descriptors from here up are served on the device (the localdevice family,
// localdevice.hpp) and never reach the host, with one exception: a poll() that mixes
// them with host sockets sends the whole array, and a backend leaves these entries'
// revents 0 and does not count them.
inline constexpr int kDeviceFdFirst = 0x40000000;
// Most pollfd entries one lane's poll() may pass.
inline constexpr uint32_t kMaxPollFds = 4096;

// gpusock's own socket options: setsockopt(fd, kSolGpusock, name, &int, sizeof(int)). A
// level no host protocol uses ("GP"); rdma/policy.hpp's kSoTransport shares it.
inline constexpr int kSolGpusock = 0x4750;
// 1: poll() answers for this socket on the device, with no hostcall (docs 12.9a). The
// backend keeps a readiness word for it in mapped memory, which kernels read. On a stream
// socket, set after listen() or connect(); accepted connections inherit it from their
// listener. getsockopt says whether the socket has it (0 where the backend could not).
inline constexpr int kSoPollOnDevice = 2;

// The readiness words (kSoPollOnDevice): module state kReadyModule, whose head is a
// ReadyHead. Word `fd` is 0 unless socket fd is polled on the device; then it is
// kReadyWatched | the poll events the host last saw (POLLIN, POLLPRI, POLLERR, POLLHUP,
// POLLRDHUP; POLLIN cleared when a receive emptied the socket). Only the socket's home
// service thread writes it; kernels read it with relaxed system-scope loads.
//
// `in_use` is one word of device memory that a kernel sets to 1 when its
// setsockopt(kSoPollOnDevice, non-zero) succeeds, and nothing clears. While it is 0 no
// socket of the runtime is polled on the device, so poll() goes straight to the host
// without reading any word across the bus. It is a hint that can only err towards that
// read: a poll through the host is right for every socket.
inline constexpr uint32_t kReadyModule = 1;
inline constexpr uint32_t kReadyWatched = 1u << 31;
struct ReadyHead {
  uint32_t* words;   // device address of the table
  uint32_t count;    // descriptors 0 .. count-1 have a word
  uint32_t pad;
  uint32_t* in_use;  // device memory: 1 once any socket was polled on the device
};

}  // namespace gpusock::net
