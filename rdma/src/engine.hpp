// The connection engine both the backend and the host-side peer library run: rdma_cm
// connection management, one RC QP per connection, receive buffers lent to the reader,
// credit-based flow control and orderly close, all as wire.hpp describes. Not
// thread-safe by itself: callers hold mu() around every call (the backend's service
// threads do; the peer library is one thread per Engine or holds the lock too).
//
// Descriptors are real host descriptors (an eventfd each, never read or written): the
// host kernel keeps them unique, so a routing backend can tell an RDMA socket from a TCP
// one by number alone, and they never reach kDeviceFdFirst (2^30).
#pragma once

#include <poll.h>
#include <rdma/rdma_cma.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace gpusock::rdma::internal {

// Where a connection's receive buffers live: `host` for the host (and for ibv_reg_mr),
// `device` the address the reader's code uses (a GPU address of mapped memory; the same
// as host for host readers). Returns 0 or -errno.
struct RecvMemory {
  std::function<int(size_t bytes, void** host, uint64_t* device)> alloc;
  // `lent`: a reader may still be copying out of it (the backend then frees at exit).
  std::function<void(void* host, bool lent)> free;
};

struct EngineOptions {
  uint32_t recv_buffers = 16;          // per connection, >= 4
  uint32_t recv_buffer_bytes = 64 * 1024;
  uint32_t send_queue_depth = 64;      // send WRs per QP
  uint32_t max_sockets = 4096;
  uint32_t resolve_timeout_ms = 5000;  // rdma_resolve_addr / rdma_resolve_route
  uint32_t linger_ms = 10000;          // a closed connection's FIN + disconnect, at most
  std::string device;                  // RDMA device name ("" = the first rdma_cm lists)
  RecvMemory memory;
};

// One answer to one call. n: result (>= 0) or -errno. For a receive, `host`/`device`
// point at the lent bytes and `flag_host`/`flag_device` at the 32-bit lent flag the reader
// sets to 0 once it copied them; all null when n <= 0.
struct RecvLend {
  const uint8_t* host = nullptr;
  uint64_t device = 0;
  uint32_t* flag_host = nullptr;
  uint64_t flag_device = 0;
};
// What a call let go (Engine::let_go) is answered. The values are net/protocol.hpp's
// kAskAgain and kSendMore (the backend checks they match): kLetGo for a call that did
// nothing, and a send's bytes so far | kSentSoFar when part of it went out.
inline constexpr int64_t kLetGo = -(int64_t{1} << 20);
inline constexpr int64_t kSentSoFar = int64_t{1} << 40;
using Done = std::function<void(int64_t)>;
using RecvDone = std::function<void(int64_t, const RecvLend&)>;
using AcceptDone = std::function<void(int64_t fd, const sockaddr_storage& peer, socklen_t len)>;

struct Sock;

class Engine {
 public:
  // Opens the RDMA device (rdma_get_devices), a protection domain, one completion queue
  // with its completion channel, and an rdma_cm event channel. Returns the engine or
  // -errno in *err (-ENODEV: no RDMA device) with a message in *msg.
  static std::unique_ptr<Engine> create(const EngineOptions& o, int* err, std::string* msg);
  ~Engine();

  std::mutex& mu() { return mu_; }
  // Registers [p, p+len) with the protection domain (IBV_ACCESS_LOCAL_WRITE). Returns the
  // lkey, or 0 with errno set. The registration lives as long as the engine.
  uint32_t register_memory(void* p, size_t len);
  std::string device_name() const;
  const EngineOptions& options() const { return o_; }

  // POSIX-shaped calls; each answers through its callback, now or from a later
  // progress(). Return contracts are those of the socket calls (docs, section 14).
  int socket(int domain, int type);                 // fd or -errno
  // Serves `fd`, a descriptor number someone else owns (the routing backend's TCP socket
  // that reserves the number), as a new RDMA socket. close() then leaves the number open.
  int adopt(int fd, int domain, bool nonblock);
  bool owns(int fd) const;
  int bind(int fd, const sockaddr* a, socklen_t len);
  int listen(int fd, int backlog);
  void accept(int fd, int flags, AcceptDone done);
  void connect(int fd, const sockaddr* a, socklen_t len, Done done);
  // `p` must lie in memory registered with register_memory() (lkey) and stay valid until
  // `done` runs.
  void send(int fd, const uint8_t* p, uint32_t len, uint32_t lkey, int flags, Done done);
  void recv(int fd, uint32_t want, int flags, RecvDone done);
  int shutdown(int fd, int how);
  int close(int fd);
  int getsockname(int fd, sockaddr_storage* a, socklen_t* len);
  int getpeername(int fd, sockaddr_storage* a, socklen_t* len);
  int setsockopt(int fd, int level, int name, std::span<const uint8_t> v);
  int getsockopt(int fd, int level, int name, uint8_t* out, uint32_t* len);
  int fcntl(int fd, int cmd, int64_t arg);
  // revents into each entry of `fds` (pollfd array); entries the engine does not own get
  // `foreign` (POLLNVAL for a lone backend). Answers the ready count.
  void poll(std::span<pollfd> fds, int timeout_ms, short foreign, Done done);

  // Waiting calls. accept, connect-less send, recv and poll that cannot be answered at
  // once wait in the engine; last_wait() is the id of the call that went to wait most
  // recently (0 before any), for a caller that may later let it go. let_go(fd, id)
  // answers that call now if it still waits, without losing a byte: a recv, accept or
  // poll gets kLetGo; a send of which nothing went out gets kLetGo and is dropped; a send
  // partly posted posts nothing more and is answered, once what it posted completed, its
  // bytes | kSentSoFar (the caller sends the rest). fd -1 for a poll. Unknown ids (the call
  // was answered) are ignored.
  uint64_t last_wait() const { return last_wait_; }
  void let_go(int fd, uint64_t id);

  // Reaps completions and connection events, takes back buffers readers returned, posts
  // what credits allow, runs timers. Returns the events handled (non-zero: keep spinning).
  uint32_t progress();
  // Blocks in poll(2) on the completion and event channels for at most `max`, after
  // arming the CQ. Call without holding mu().
  void wait(std::chrono::nanoseconds max);
  // Fails every waiting call with `err` and destroys every connection.
  void teardown(int err);

  struct Counters {
    uint64_t data_messages_sent = 0, data_messages_received = 0;
    uint64_t credit_messages_sent = 0, fins_sent = 0;
    uint64_t send_blocked_on_credits = 0;  // times a data send waited for credits
  };
  Counters counters() const { return counters_; }

 private:
  Engine() = default;
  std::shared_ptr<Sock> find(int fd) const;
  std::shared_ptr<Sock> by_serial(uint64_t s) const;
  int make_fd();
  int ensure_id(Sock& s);
  int setup_connection(Sock& s, uint32_t peer_bufs, uint32_t peer_bytes);
  void post_recv(Sock& s, uint32_t idx);
  void pump(Sock& s);
  // Answers the first queued send if it is done: all its bytes completed, or let go and
  // all it posted completed (then its bytes | kSentSoFar). Whether it did.
  bool answer_front_send(Sock& s);
  void serve_recvs(Sock& s);
  void serve_accepts(Sock& s);
  void fail_conn(Sock& s, int err);
  void destroy(Sock& s);
  void maybe_destroy(const std::shared_ptr<Sock>& s);
  uint32_t poll_cq();
  uint32_t cm_events();
  uint32_t recycle();
  void handle_cm(rdma_cm_event* ev);
  void check_polls(bool timers);
  short revents_of(const Sock& s, short events) const;

  EngineOptions o_;
  std::mutex mu_;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_comp_channel* cc_ = nullptr;
  ibv_cq* cq_ = nullptr;
  uint32_t cq_capacity_ = 0, cq_reserved_ = 0;
  rdma_event_channel* ec_ = nullptr;
  std::vector<ibv_mr*> mrs_;
  uint64_t next_serial_ = 1;
  std::unordered_map<int, std::shared_ptr<Sock>> fds_;
  std::unordered_map<uint64_t, std::shared_ptr<Sock>> serials_;  // every live Sock, closed ones too
  struct PollWait {
    std::span<pollfd> fds;
    short foreign;
    std::chrono::steady_clock::time_point deadline;
    bool forever;
    Done done;
    uint64_t id;
  };
  std::deque<PollWait> polls_;
  uint64_t next_wait_ = 1, last_wait_ = 0;
  uint64_t wait_id() { return last_wait_ = next_wait_++; }
  uint32_t lent_socks_ = 0;  // sockets with a buffer lent to a reader
  std::chrono::steady_clock::time_point next_timer_{};
  Counters counters_;
  bool torn_down_ = false;
};

}  // namespace gpusock::rdma::internal
