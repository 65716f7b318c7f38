// Decodes socket hostcalls (protocol.hpp) into per-lane Requests for a Backend.
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <mutex>
#include <vector>

#include "decode.hpp"
#include "gpusock/net/backend.hpp"

namespace gpusock::net {

namespace internal {
namespace {
int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

// Where a lane waits (Reply::wait_begin), for the straggler sweep: the backend, null when
// the lane is not waiting, and the backend's token.
struct LaneWait {
  std::atomic<Backend*> owner{nullptr};
  std::atomic<uint64_t> token{0};
};

// The lanes of one deferred call. `remaining` counts unfinished lanes plus one held by the
// dispatcher while it hands lanes out, so the group outlives the loop that fills it.
// `refs` is one for the lanes plus one while the straggler queue holds the group.
struct CallGroup {
  CallGroup(hostcall::DeferredCall c, Backend* b) : call(std::move(c)), backend(b) {}
  hostcall::DeferredCall call;
  Backend* backend = nullptr;  // the one dispatch() served the lanes through
  uint32_t lanes = 0;
  std::atomic<uint32_t> remaining{0};
  std::atomic<uint32_t> refs{1};
  std::atomic<bool> queued{false};  // in the straggler queue (set once)
  std::atomic<bool> due{false};     // straggler_wait() has passed since a lane was answered
  LaneWait waits[kWarpSize];
};

struct HostReply {
  Reply::HostSink sink;
  uint64_t words[hostcall::kMaxArgs] = {};
};

void unref(CallGroup* g) {
  if (g->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete g;
}

// Calls partly answered, by the time their waiting lanes are due to be let go. One queue
// for the process: a call's lanes may wait in several backends (rdma/'s router).
struct Stragglers {
  std::mutex mu;
  std::vector<std::pair<int64_t, CallGroup*>> heap;  // min-heap on the time
  std::atomic<int64_t> next{INT64_MAX};               // heap.front().first, or INT64_MAX

  static bool later(const std::pair<int64_t, CallGroup*>& a, const std::pair<int64_t, CallGroup*>& b) {
    return a.first > b.first;
  }
  void push(int64_t at, CallGroup* g) {
    std::lock_guard<std::mutex> lock(mu);
    heap.emplace_back(at, g);
    std::push_heap(heap.begin(), heap.end(), later);
    next.store(heap.front().first, std::memory_order_relaxed);
  }
  void pop_due(int64_t now, std::vector<CallGroup*>& out) {
    std::lock_guard<std::mutex> lock(mu);
    while (!heap.empty() && heap.front().first <= now) {
      std::pop_heap(heap.begin(), heap.end(), later);
      out.push_back(heap.back().second);
      heap.pop_back();
    }
    next.store(heap.empty() ? INT64_MAX : heap.front().first, std::memory_order_relaxed);
  }
};

Stragglers& stragglers() {
  static Stragglers* s = new Stragglers;  // never destroyed: backends may sweep during exit
  return *s;
}

// `lane`: a lane was answered (false: the dispatcher let go of its hold, or a helper lane
// was answered, Reply::finish_helper()).
void lane_finished(CallGroup* g, bool lane) {
  // The first lane answered while others may still wait: from then on they hold it back,
  // so the call goes in the straggler queue. The queue's reference is taken before the
  // count drops, since the last lane may finish (and drop the lanes' reference) meanwhile.
  const bool queue = lane && g->lanes > 1 && !g->queued.load(std::memory_order_relaxed) &&
                     !g->queued.exchange(true, std::memory_order_relaxed);
  if (queue) g->refs.fetch_add(1, std::memory_order_relaxed);
  // acq_rel: the last finisher sees every other lane's result words before it answers.
  const uint32_t left = g->remaining.fetch_sub(1, std::memory_order_acq_rel) - 1;
  if (left == 0) {
    g->call.complete();
    if (queue) unref(g);
    unref(g);
    return;
  }
  if (queue) stragglers().push(steady_ns() + g->backend->straggler_wait().count(), g);
}
}  // namespace internal

uint32_t sweep_stragglers() {
  internal::Stragglers& q = internal::stragglers();
  if (q.next.load(std::memory_order_relaxed) == INT64_MAX) return 0;
  const int64_t now = internal::steady_ns();
  if (now < q.next.load(std::memory_order_relaxed)) return 0;
  std::vector<internal::CallGroup*> due;
  q.pop_due(now, due);
  for (internal::CallGroup* g : due) {
    if (g->remaining.load(std::memory_order_acquire) == 0) {
      internal::unref(g);
      continue;
    }
    g->due.store(true, std::memory_order_release);
    for (internal::LaneWait& w : g->waits) {
      Backend* owner = w.owner.load(std::memory_order_acquire);
      if (owner != nullptr) owner->straggle(w.token.load(std::memory_order_relaxed));
    }
    // Looked at again after another wait: a lane may have begun a new wait (a backend
    // re-parks a lane whose operation had to be submitted again) that this pass missed.
    q.push(now + g->backend->straggler_wait().count(), g);
  }
  return static_cast<uint32_t>(due.size());
}

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

void Reply::finish(int64_t result) { finish_impl(result, true); }
void Reply::finish_helper(int64_t result) { finish_impl(result, false); }

void Reply::finish_impl(int64_t result, bool holds) {
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
  g->waits[lane_].owner.store(nullptr, std::memory_order_relaxed);
  g->call.call().set_result(lane_, 0, static_cast<uint64_t>(result));
  internal::lane_finished(g, holds);
}

void Reply::wait_begin(Backend& owner, uint64_t token) {
  if (group_ == nullptr) return;
  internal::LaneWait& w = group_->waits[lane_];
  w.token.store(token, std::memory_order_relaxed);
  w.owner.store(&owner, std::memory_order_release);
}

bool Reply::straggling() const {
  return group_ != nullptr && group_->due.load(std::memory_order_acquire);
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
  // Backends that drive the sweep from their poll() make this redundant; for those that do
  // not, it keeps the queue from growing (their straggle() does nothing).
  sweep_stragglers();
  const OpInfo info = descriptor_write ? OpInfo{Op::kSend, 1} : op_info(call.opcode());
  if (call.lane_mask() == 0) return;  // nothing to answer per lane; the core answers 0
  // Size the result rows once, here, before any lane can finish on another thread.
  call.set_result(static_cast<uint32_t>(__builtin_ctz(call.lane_mask())), info.results - 1, 0);
  auto* group = new internal::CallGroup(call.defer(), &backend);
  hostcall::Call& c = group->call.call();
  group->lanes = static_cast<uint32_t>(__builtin_popcount(c.lane_mask()));
  group->remaining.store(group->lanes + 1, std::memory_order_relaxed);
  c.for_each_lane([&](uint32_t lane) {
    Request req;
    Reply reply(group, lane);
    int r = decode_request(CallLane{c, lane}, info.op, descriptor_write, req);
    if (r > 0) {
      reply.finish_helper(0);  // a warp_send() lane that only helps copy
      return;
    }
    if (r < 0) {
      reply.finish(r);
      return;
    }
    if (req.src != 0 && !backend.pulls()) {
      reply.finish(kCopyInstead);  // the lane copies the bytes into staging
      return;
    }
    backend.serve(req, std::move(reply));
  });
  internal::lane_finished(group, false);
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
