// net/src/decode.hpp — socket hostcall argument words (protocol.hpp) to a backend Request,
// for one lane. Header-only and free of Call and Core, so the dispatcher (dispatch.cpp)
// and tests/fuzz run the same code: the dispatcher over a Call's lane, the fuzzer over
// argument words and a staging arena it makes up.
//
//   struct Lane {  // what decode_request() needs of a lane
//     uint64_t arg(uint32_t k) const;                                  // 0 past nargs
//     int payload(uint32_t k, std::span<const uint8_t>* out) const;    // Call::payload's contract
//   };
//   Request req;
//   int r = decode_request(lane, op_info(opcode).op, false, req);
#pragma once

#include <sys/socket.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <span>

#include "gpusock/net/backend.hpp"
#include "gpusock/net/protocol.hpp"

namespace gpusock::net {

struct OpInfo {
  Op op;
  uint32_t results;  // result words per lane
};

// The Op behind a socket opcode and the result words its reply needs (docs section 12.3).
// An opcode outside op::kFirst..op::kLast gives {kClose, 1}; attach() registers only those.
inline OpInfo op_info(uint32_t opcode) {
  switch (opcode) {
    case op::kSocket: return {Op::kSocket, 1};
    case op::kBind: return {Op::kBind, 1};
    case op::kListen: return {Op::kListen, 1};
    case op::kAccept: return {Op::kAccept, 6};
    case op::kConnect: return {Op::kConnect, 1};
    case op::kSend: return {Op::kSend, 1};
    case op::kRecv: return {Op::kRecv, 8};
    case op::kShutdown: return {Op::kShutdown, 1};
    case op::kClose: return {Op::kClose, 1};
    case op::kSetsockopt: return {Op::kSetsockopt, 1};
    case op::kGetsockopt: return {Op::kGetsockopt, 6};
    case op::kGetsockname: return {Op::kGetsockname, 6};
    case op::kGetpeername: return {Op::kGetpeername, 6};
    case op::kPoll: return {Op::kPoll, 1};
    case op::kFcntl: return {Op::kFcntl, 1};
    default: return {Op::kClose, 1};
  }
}

// Fills `req` from one lane's argument words. Returns 0, 1 for a lane that needs no I/O
// (its answer is 0), or -errno for a malformed request (a kernel wrote garbage or bypassed
// socket.hpp): that lane alone fails. The errors are the lane's payload() errors (EINVAL,
// EFAULT) and EINVAL for the size checks of section 12.3. req.data, when set, is the view
// payload() returned.
template <typename Lane>
int decode_request(const Lane& lane, Op op, bool descriptor_write, Request& req) {
  auto arg = [&](uint32_t k) { return lane.arg(k); };
  auto payload = [&](uint32_t k) -> int {
    std::span<const uint8_t> p;
    int r = lane.payload(k, &p);
    if (r != 0) return r;
    // The staging pages are host memory the call holds; poll writes revents back into them.
    req.data = std::span<uint8_t>(const_cast<uint8_t*>(p.data()), p.size());
    return 0;
  };
  req.op = op;
  if (descriptor_write) {  // hostcall::op::kDescriptorWrite: {fd, payload}
    req.op = Op::kSend;
    req.fd = static_cast<int32_t>(arg(0));
    return payload(1);
  }
  switch (op) {
    case Op::kSocket:
      req.a[0] = static_cast<int32_t>(arg(0));
      req.a[1] = static_cast<int32_t>(arg(1));
      req.a[2] = static_cast<int32_t>(arg(2));
      return 0;
    case Op::kBind:
    case Op::kConnect:
      req.fd = static_cast<int32_t>(arg(0));
      if (int r = payload(1); r != 0) return r;
      return req.data.size() <= sizeof(sockaddr_storage) ? 0 : -EINVAL;
    case Op::kListen:
    case Op::kAccept:
    case Op::kShutdown:
      req.fd = static_cast<int32_t>(arg(0));
      req.a[0] = static_cast<int32_t>(arg(1));
      return 0;
    case Op::kSend: {
      req.fd = static_cast<int32_t>(arg(0));
      const uint64_t w = arg(1);
      req.a[0] = static_cast<int32_t>(static_cast<uint32_t>(w));
      req.addr_len = static_cast<uint32_t>(w >> 32);
      if (req.addr_len == kRideAlong) return 1;  // answered 0 by the dispatcher, no I/O
      if (req.addr_len == kPullSource) {
        // Bytes in device memory: address and length only. Whether the host may read them
        // is the backend's check (Runtime::start_fetch()); 0 bytes or a null address is
        // a malformed request.
        req.addr_len = 0;
        req.src = arg(2);
        req.a[1] = static_cast<int64_t>(arg(3));
        return req.src != 0 && arg(3) != 0 && arg(3) <= kPullMaxBytes ? 0 : -EINVAL;
      }
      if (req.addr_len > kMaxAddrBytes) return -EINVAL;
      for (uint32_t k = 0; k < 4; ++k) {
        uint64_t v = arg(2 + k);
        std::memcpy(req.addr + 8 * k, &v, 8);
      }
      return payload(6);
    }
    case Op::kRecv:
      req.fd = static_cast<int32_t>(arg(0));
      req.a[0] = static_cast<int32_t>(arg(1));
      req.a[1] = static_cast<int64_t>(static_cast<uint32_t>(arg(2)));
      req.a[2] = static_cast<int64_t>(arg(3));  // dst: only ever checked by Runtime::deliver()
      return 0;
    case Op::kClose:
    case Op::kGetsockname:
    case Op::kGetpeername:
      req.fd = static_cast<int32_t>(arg(0));
      return 0;
    case Op::kSetsockopt:
      req.fd = static_cast<int32_t>(arg(0));
      req.a[0] = static_cast<int32_t>(arg(1));
      req.a[1] = static_cast<int32_t>(arg(2));
      if (int r = payload(3); r != 0) return r;
      return req.data.size() <= kMaxOptBytes ? 0 : -EINVAL;
    case Op::kGetsockopt:
      req.fd = static_cast<int32_t>(arg(0));
      req.a[0] = static_cast<int32_t>(arg(1));
      req.a[1] = static_cast<int32_t>(arg(2));
      req.a[2] = static_cast<int64_t>(static_cast<uint32_t>(arg(3)));
      return 0;
    case Op::kPoll: {
      const uint64_t nfds = arg(0);
      req.a[0] = static_cast<int64_t>(nfds);
      req.a[1] = static_cast<int32_t>(arg(1));
      if (nfds > kMaxPollFds) return -EINVAL;
      if (int r = payload(2); r != 0) return r;
      return req.data.size() == nfds * 8 ? 0 : -EINVAL;  // sizeof(pollfd) on both sides
    }
    case Op::kFcntl:
      req.fd = static_cast<int32_t>(arg(0));
      req.a[0] = static_cast<int32_t>(arg(1));
      req.a[1] = static_cast<int32_t>(arg(2));
      return 0;
  }
  return -ENOSYS;
}

}  // namespace gpusock::net
