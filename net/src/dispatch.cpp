// Decodes socket hostcalls (protocol.hpp) into per-lane Requests for a Backend.
#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "decode.hpp"
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

// One lane of a hostcall::Call, as decode_request() reads it.
struct CallLane {
  const hostcall::Call& call;
  uint32_t lane;
  uint64_t arg(uint32_t k) const { return call.arg(lane, k); }
  int payload(uint32_t k, std::span<const uint8_t>* out) const { return call.payload(lane, k, out); }
};

void dispatch(Backend& backend, hostcall::Call& call, bool descriptor_write) {
  const OpInfo info = descriptor_write ? OpInfo{Op::kSend, 1} : op_info(call.opcode());
  if (call.lane_mask() == 0) return;  // nothing to answer per lane; the core answers 0
  // Size the result rows once, here, before any lane can finish on another thread.
  call.set_result(static_cast<uint32_t>(__builtin_ctz(call.lane_mask())), info.results - 1, 0);
  auto* group = new internal::CallGroup{call.defer(), {}};
  hostcall::Call& c = group->call.call();
  group->remaining.store(static_cast<uint32_t>(__builtin_popcount(c.lane_mask())) + 1, std::memory_order_relaxed);
  c.for_each_lane([&](uint32_t lane) {
    Request req;
    Reply reply(group, lane);
    int r = decode_request(CallLane{c, lane}, info.op, descriptor_write, req);
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
    std::string name = std::string("net.") + to_string(op_info(opcode).op);
    Status s = rt.register_handler(opcode, name, [b = backend.get()](hostcall::Call& call) { dispatch(*b, call, false); });
    if (!s.ok()) return s;
  }
  return rt.register_descriptor_write([b = backend.get()](hostcall::Call& call) { dispatch(*b, call, true); });
}

}  // namespace gpusock::net
