// gpusock/net/backend.hpp — the host side of sockets: the interface a transport
// implements (io_uring in iouring_host/, RDMA verbs in rdma/) and attach(), which wires
// one into a runtime. Host-only.
//
//   auto rt = gpusock::Runtime::create(opts);
//   auto be = gpusock::iouring::create_backend(**rt);   // or your own net::Backend
//   gpusock::net::attach(**rt, *be);                     // kernels can now use sockets
//
// net/ decodes each lane's socket hostcall into a Request (sizes of addresses, option
// values and poll arrays already checked against the protocol's limits; descriptors not:
// they are the backend's) and hands it to Backend::serve() with a Reply that answers that
// lane. The lanes of one warp call are answered together once every lane's Reply has
// finished, in whatever order and on whatever threads they finish.
//
// Stragglers. Because a call is answered only when its last lane is, a lane blocked in a
// wait (recv with no data, accept with no connection, poll with nothing ready, a send into
// a full socket) holds back the lanes of its call that are done, and deadlocks when their
// progress is what it waits for. So a backend marks each lane it parks in such a wait with
// Reply::wait_begin(); once another lane of the call has been answered for longer than
// straggler_wait(), net/ calls Backend::straggle() with the lane's token, and the backend
// ends the wait without losing a byte: it answers kAskAgain (protocol.hpp), or a stream
// send's bytes so far | kSendMore, and the device asks again in a call of its own. A
// backend that calls sweep_stragglers() from its poll() drives this; one that does not
// keeps the plain rule (its lanes are answered when their operations end).
#pragma once

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "gpusock/hostcall/handler.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/service_hook.hpp"
#include "gpusock/hostcall/status.hpp"
#include "gpusock/net/protocol.hpp"

namespace gpusock::net {

enum class Op : uint8_t {
  kSocket,       // a[0] domain, a[1] type (with SOCK_NONBLOCK/SOCK_CLOEXEC), a[2] protocol
  kBind,         // data: the address
  kListen,       // a[0] backlog
  kAccept,       // a[0] flags
  kConnect,      // data: the address
  kSend,         // a[0] flags; data: the bytes; addr/addr_len: destination (addr_len 0: none)
  kRecv,         // a[0] flags, a[1] most bytes
  kShutdown,     // a[0] how
  kClose,        //
  kSetsockopt,   // a[0] level, a[1] name; data: the value
  kGetsockopt,   // a[0] level, a[1] name, a[2] room for the value
  kGetsockname,  //
  kGetpeername,  //
  kPoll,         // a[0] nfds, a[1] timeout ms; data: pollfd[nfds], revents written in place
  kFcntl,        // a[0] cmd, a[1] arg
};
const char* to_string(Op op);

struct Request {
  Op op = Op::kClose;
  int fd = -1;
  int64_t a[3] = {};
  // A view into the lane's staging pages, valid until its Reply finishes. Writable: poll
  // answers revents in place.
  std::span<uint8_t> data;
  uint8_t addr[kMaxAddrBytes] = {};
  uint32_t addr_len = 0;
  // kSend of bytes left in device memory (protocol.hpp, kPullSource): their device address,
  // a[1] their length; `data` is empty. Only a backend whose pulls() is true gets these.
  uint64_t src = 0;
};

class Backend;

namespace internal {
struct CallGroup;
struct HostReply;
}

// Answers one lane. Move-only; finish() exactly once. A Reply destroyed unfinished answers
// -ECANCELED, so no lane is ever left waiting.
class Reply {
 public:
  Reply() = default;
  Reply(internal::CallGroup* group, uint32_t lane) : group_(group), lane_(lane) {}
  Reply(Reply&& other) noexcept : group_(other.group_), host_(other.host_), lane_(other.lane_) {
    other.group_ = nullptr;
    other.host_ = nullptr;
  }
  Reply& operator=(Reply&& other) noexcept;
  Reply(const Reply&) = delete;
  Reply& operator=(const Reply&) = delete;
  ~Reply();

  // A Reply that answers a host function instead of a lane, for a backend that serves a
  // call through another backend and needs its answer (rdma/'s routing backend reads the
  // descriptor socket() made). `sink` gets r[0] and the result words (words[0] == result)
  // once, on the thread that finishes; unfinished, it gets -ECANCELED.
  using HostSink = std::function<void(int64_t result, const uint64_t* words)>;
  static Reply to_host(HostSink sink);

  explicit operator bool() const { return group_ != nullptr || host_ != nullptr; }
  // Result word k (1..kMaxArgs-1) of this lane; word 0 is finish()'s.
  void set_word(uint32_t k, uint64_t value);
  // An address in result words: word `len_word` = len | extra, the bytes from len_word+1.
  void set_addr(uint32_t len_word, const void* addr, uint32_t len, uint64_t extra = 0);
  // Result word 0 (a value or -errno) and done. The call is answered when its last lane is.
  void finish(int64_t result);
  // As finish(), for a lane that only helps another lane of its call and has nothing of
  // its own to wait for (a warp_recv() lane asking 0 bytes): its answer does not make the
  // call's other lanes stragglers (see Stragglers above).
  void finish_helper(int64_t result);

  // This lane now waits in `owner` until something outside happens; `token` is what
  // owner.straggle() will be given if the lane is to be let go (see Stragglers above). A
  // later wait_begin() replaces it; finish() ends it. No effect on a host Reply.
  void wait_begin(Backend& owner, uint64_t token);
  // Whether the call's other lanes have waited on this one for longer than
  // straggler_wait(): a backend answers such a lane kAskAgain instead of parking it again.
  bool straggling() const;

 private:
  void finish_impl(int64_t result, bool holds);

  internal::CallGroup* group_ = nullptr;
  internal::HostReply* host_ = nullptr;
  uint32_t lane_ = 0;
};

// One socket as an operator sees it (Backend::list_sockets()).
struct SocketInfo {
  int fd = -1;                // the descriptor kernels use
  int family = 0;             // AF_INET, AF_INET6, ...
  int type = 0;               // SOCK_STREAM, SOCK_DGRAM
  std::string state;          // "open", "listening", "connected" or "aborted"
  bool listener = false;      // listen() succeeded on it (still true once aborted)
  sockaddr_storage local{};   // local_len 0: unbound
  socklen_t local_len = 0;
  sockaddr_storage peer{};    // peer_len 0: no peer
  socklen_t peer_len = 0;
  uint64_t bytes_in = 0;      // received by kernels so far
  uint64_t bytes_out = 0;     // sent by kernels so far
  std::string backend;        // Backend::name()
};

// Something that happened to a socket, for observers (the control plane's event stream).
struct SocketEvent {
  enum class Kind : uint8_t { kOpened, kClosed, kAborted, kError };
  Kind kind = Kind::kOpened;
  int fd = -1;
  int family = 0;
  int type = 0;
  int error = 0;              // kError: the errno an operation failed with
  const char* backend = "";   // Backend::name()
};
const char* to_string(SocketEvent::Kind kind);

class SocketObserver {
 public:
  virtual ~SocketObserver() = default;
  // Called on the thread where the event happened (often a hostcall service thread):
  // must be quick and must not call back into the backend.
  virtual void on_socket_event(const SocketEvent& event) = 0;
};

// A transport. serve() runs on hostcall service threads (several at once when the runtime
// has several); the ServiceHook methods let the backend run its event loop on them.
//
// The control methods (list_sockets, abort_socket, stop_accepting, set_observer) are
// called from other threads (the control plane's), never on the hot path. Their defaults
// suit a backend without a socket table; a backend that composes others forwards them.
class Backend : public hostcall::ServiceHook {
 public:
  ~Backend() override = default;

  // Lets go of the lane that called reply.wait_begin(*this, token): answers it kAskAgain
  // (or a send's partial count | kSendMore) as soon as that can be done without losing a
  // byte, and only if reply.straggling(); a token whose lane has finished is ignored.
  // Called from any thread (a sweep_stragglers() of any backend), so it must be
  // thread-safe. Default: nothing (lanes wait until their operations end).
  virtual void straggle(uint64_t token) { (void)token; }
  // How long the lanes of a call that are done wait for its others before those are let
  // go (20 us by default). Set it before kernels run.
  std::chrono::nanoseconds straggler_wait() const { return straggler_wait_; }
  void set_straggler_wait(std::chrono::nanoseconds wait) { straggler_wait_ = wait; }
  virtual const char* name() const = 0;
  // One line: what the backend found at start (kernel features, fallbacks taken).
  virtual std::string describe() const = 0;
  // Serves one lane's request: calls reply.finish() now or later, from any thread.
  virtual void serve(Request& req, Reply reply) = 0;
  // Whether serve() takes sends whose bytes are in device memory (Request::src). When
  // false (the default) net/ answers them kCopyInstead and the lane copies the bytes into
  // staging. A backend that pulls may still answer kCopyInstead, socket by socket.
  virtual bool pulls() const { return false; }

  // The sockets open now, ascending by descriptor. Default: none.
  virtual std::vector<SocketInfo> list_sockets() { return {}; }
  // Aborts socket `fd` from outside the kernel: calls waiting on it and every later call
  // on it except close() answer -ECONNABORTED; close() still frees it. Returns 0, -EBADF
  // when `fd` is not one of this backend's sockets, -ENOTSUP (the default).
  virtual int abort_socket(int fd) { return -ENOTSUP; }
  // Stops accepting connections: open listeners are aborted (as abort_socket) and later
  // listen() calls answer -ECONNABORTED; connections already accepted go on. Returns the
  // number of listeners aborted, or -ENOTSUP (the default).
  virtual int stop_accepting() { return -ENOTSUP; }
  // Installs the observer told about sockets opened, closed, aborted and failing (one at a
  // time; null removes it). A composing backend forwards it to its parts.
  virtual void set_observer(std::shared_ptr<SocketObserver> observer) {
    std::lock_guard<std::mutex> lock(observer_mu_);
    observer_ = std::move(observer);
    has_observer_.store(observer_ != nullptr, std::memory_order_release);
  }

 protected:
  // Tells the observer, if there is one. Without one it costs a single atomic load.
  void notify(const SocketEvent& event) {
    if (!has_observer_.load(std::memory_order_acquire)) return;
    std::shared_ptr<SocketObserver> o;
    {
      std::lock_guard<std::mutex> lock(observer_mu_);
      o = observer_;
    }
    if (o) o->on_socket_event(event);
  }

 private:
  std::chrono::nanoseconds straggler_wait_ = std::chrono::microseconds(20);
  std::mutex observer_mu_;
  std::shared_ptr<SocketObserver> observer_;
  std::atomic<bool> has_observer_{false};
};

// Lets go of the lanes due (Backend::straggle()) across every backend in the process;
// returns how many calls it looked at. Cheap when none is due: one relaxed load, plus a
// clock read while some call is partly answered. Backends call it from poll().
uint32_t sweep_stragglers();

// Registers the socket hostcalls on `rt` and installs `backend` as its service hook.
// Returns ok, or EEXIST when the runtime already has a backend (or another service hook).
Status attach(Runtime& rt, std::shared_ptr<Backend> backend);

}  // namespace gpusock::net
