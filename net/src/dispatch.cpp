// Decodes socket hostcalls (protocol.hpp) into per-lane Requests for a Backend.
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "gpusock/net/backend.hpp"

namespace gpusock::net {

namespace internal {
// The lanes of one deferred call. `remaining` counts unfinished lanes plus one held by the
// dispatcher while it hands lanes out, so the group outlives the loop that fills it.
struct CallGroup {
  hostcall::DeferredCall call;
  std::atomic<uint32_t> remaining{0};
};

struct HostReply {
  Reply::HostSink sink;
  uint64_t words[hostcall::kMaxArgs] = {};
};

void lane_finished(CallGroup* g) {
  // acq_rel: the last finisher sees every other lane's result words before it answers.
  if (g->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    g->call.complete();
    delete g;
  }
}
}  // namespace internal

const char* to_string(Op op) {
  switch (op) {
    case Op::kSocket: return "socket";
    case Op::kBind: return "bind";
    case Op::kListen: return "listen";
    case Op::kAccept: return "accept";
    case Op::kConnect: return "connect";
    case Op::kSend: return "send";
    case Op::kRecv: return "recv";
    case Op::kShutdown: return "shutdown";
    case Op::kClose: return "close";
    case Op::kSetsockopt: return "setsockopt";
    case Op::kGetsockopt: return "getsockopt";
    case Op::kGetsockname: return "getsockname";
    case Op::kGetpeername: return "getpeername";
    case Op::kPoll: return "poll";
    case Op::kFcntl: return "fcntl";
  }
  return "?";
}

Reply Reply::to_host(HostSink sink) {
  Reply r;
  r.host_ = new internal::HostReply{std::move(sink)};
  return r;
}

const char* to_string(SocketEvent::Kind kind) {
  switch (kind) {
    case SocketEvent::Kind::kOpened: return "opened";
    case SocketEvent::Kind::kClosed: return "closed";
    case SocketEvent::Kind::kAborted: return "aborted";
    case SocketEvent::Kind::kError: return "error";
  }
  return "?";
}

Reply& Reply::operator=(Reply&& other) noexcept {
  if (this != &other) {
    if (group_ != nullptr || host_ != nullptr) finish(-ECANCELED);
    group_ = other.group_;
    host_ = other.host_;
    lane_ = other.lane_;
    other.group_ = nullptr;
    other.host_ = nullptr;
  }
  return *this;
}

Reply::~Reply() {
  if (group_ != nullptr || host_ != nullptr) finish(-ECANCELED);
}

void Reply::set_word(uint32_t k, uint64_t value) {
  if (host_ != nullptr) {
    if (k > 0 && k < hostcall::kMaxArgs) host_->words[k] = value;
    return;
  }
  // Result rows were sized for the opcode before the lanes were handed out, so writing a
  // word only touches this lane's column: lanes finishing on different threads never
  // write the same memory.
  if (group_ == nullptr || k == 0 || k >= hostcall::kMaxArgs) return;
  group_->call.call().set_result(lane_, k, value);
}

void Reply::set_addr(uint32_t len_word, const void* addr, uint32_t len, uint64_t extra) {
  if (len > kMaxAddrBytes) len = kMaxAddrBytes;
  set_word(len_word, len | extra);
  uint8_t bytes[kMaxAddrBytes] = {};
  if (len > 0) std::memcpy(bytes, addr, len);
  for (uint32_t k = 0; k < kMaxAddrBytes / 8 && len_word + 1 + k < hostcall::kMaxArgs; ++k) {
    uint64_t w;
    std::memcpy(&w, bytes + 8 * k, 8);
    set_word(len_word + 1 + k, w);
  }
}

void Reply::finish(int64_t result) {
  if (host_ != nullptr) {
    internal::HostReply* h = host_;
    host_ = nullptr;
    h->words[0] = static_cast<uint64_t>(result);
    if (h->sink) h->sink(result, h->words);
    delete h;
    return;
  }
  if (group_ == nullptr) return;
  internal::CallGroup* g = group_;
  group_ = nullptr;
  g->call.call().set_result(lane_, 0, static_cast<uint64_t>(result));
  internal::lane_finished(g);
}

namespace {

struct OpInfo {
  Op op;
  uint32_t results;  // result words per lane
};

OpInfo info_for(uint32_t opcode) {
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

// Fills `req` from lane `lane` of `call`. Returns 0, 1 for a lane that needs no I/O (its
// answer is 0), or -errno for a malformed request (a kernel wrote garbage or bypassed
// socket.hpp): that lane alone fails.
int decode(const hostcall::Call& call, uint32_t lane, Op op, bool descriptor_write, Request& req) {
  auto arg = [&](uint32_t k) { return call.arg(lane, k); };
  auto payload = [&](uint32_t k) -> int {
    std::span<const uint8_t> p;
    int r = call.payload(lane, k, &p);
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

void dispatch(Backend& backend, hostcall::Call& call, bool descriptor_write) {
  const OpInfo info = descriptor_write ? OpInfo{Op::kSend, 1} : info_for(call.opcode());
  if (call.lane_mask() == 0) return;  // nothing to answer per lane; the core answers 0
  // Size the result rows once, here, before any lane can finish on another thread.
  call.set_result(static_cast<uint32_t>(__builtin_ctz(call.lane_mask())), info.results - 1, 0);
  auto* group = new internal::CallGroup{call.defer(), {}};
  hostcall::Call& c = group->call.call();
  group->remaining.store(static_cast<uint32_t>(__builtin_popcount(c.lane_mask())) + 1, std::memory_order_relaxed);
  c.for_each_lane([&](uint32_t lane) {
    Request req;
    Reply reply(group, lane);
    int r = decode(c, lane, info.op, descriptor_write, req);
    if (r != 0) {
      reply.finish(r > 0 ? 0 : r);
      return;
    }
    backend.serve(req, std::move(reply));
  });
  internal::lane_finished(group);
}

}  // namespace

Status attach(Runtime& rt, std::shared_ptr<Backend> backend) {
  if (backend == nullptr) return Status(EINVAL, "net::attach: null backend");
  if (Status s = rt.set_service_hook(backend); !s.ok()) return s;
  for (uint32_t opcode = op::kFirst; opcode <= op::kLast; ++opcode) {
    std::string name = std::string("net.") + to_string(info_for(opcode).op);
    Status s = rt.register_handler(opcode, name, [b = backend.get()](hostcall::Call& call) { dispatch(*b, call, false); });
    if (!s.ok()) return s;
  }
  return rt.register_descriptor_write([b = backend.get()](hostcall::Call& call) { dispatch(*b, call, true); });
}

}  // namespace gpusock::net
