// examples/echo/echo_server.hpp — a TCP echo server that is a kernel.
//
//   EchoConfig cfg;                                   // port, limits
//   auto state = EchoState::create(*rt, warps, cfg);  // per-warp tables and buffers
//   launch(*rt, {blocks}, {threads}, EchoServer{}, state->view());
//   ...                                               // state->request_stop() ends it
//
// Every warp is an independent server: it opens its own listening socket on the port
// with SO_REUSEPORT (so the host kernel spreads new connections across warps) and owns up
// to `conns_per_warp` connections. One pass of its event loop costs three hostcalls
// whatever the number of connections (two with `device_poll`):
//
//   1. poll: the warp polls the listener and every connection at once (at most
//      `poll_ms`, so a stop request is seen within that time): one hostcall from lane 0,
//      or, with `device_poll` (kSoPollOnDevice on the listener, which its connections
//      inherit), warp_poll() over the host's readiness words with no hostcall (docs
//      12.9a). While the warp is busy (bytes came in during the last `spin_passes`
//      passes) it skips the poll and tries every connection instead (step 2 answers
//      EAGAIN for the idle ones).
//   2. recv: the ready connections are handed out to the 32 lanes, which receive together
//      (MSG_DONTWAIT): one hostcall carries up to 32 receives. Lanes never block on their
//      own, because lanes that call together are answered together. While the warp
//      holds at most `copy_help_max_conns` connections, the idle lanes join the call
//      with zero-byte asks and help copy the bytes out of the host's buffers (and, in
//      step 3, into staging): one connection's 4 KiB is then two rounds of loads, not 32.
//   3. send: the lanes that received send the bytes back together (MSG_DONTWAIT). What a
//      full socket buffer does not take stays in the connection's buffer; the connection
//      then waits for POLLOUT and is not read until it is drained, so a client that does
//      not read slows only itself, and no byte is dropped.
//
// Accepting: when the listener is readable, every lane with a free connection slot calls
// accept4(SOCK_NONBLOCK) together — one hostcall accepts up to 32 connections.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/warp.hpp"
#include "gpusock/net/socket.hpp"

namespace gpusock::examples {

inline constexpr uint32_t kMaxConnsPerWarp = 1024;

struct EchoConfig {
  uint16_t port = 7777;
  uint32_t addr_be = 0;               // IPv4 address to listen on, network order (0: any)
  uint32_t conns_per_warp = 64;       // connection slots per warp (<= kMaxConnsPerWarp)
  uint32_t buffer_bytes = 16384;      // per-connection buffer: most bytes read at once
  int poll_ms = 20;                   // longest poll; bounds how late a stop is seen
  // After a pass that received bytes, this many passes skip poll and try a non-blocking
  // recv on every connection (busy polling, as SO_BUSY_POLL does for a socket): under
  // load that saves the poll's hostcall and its wake-up; idle, the warp waits in poll.
  // 0 turns it off.
  uint32_t spin_passes = 8;
  int backlog = 1024;
  // Poll on the device (net::kSoPollOnDevice on the listener, inherited by connections;
  // docs 12.9a): no poll hostcall. Off by default: on the H100 the server was faster
  // polling through the host (bench/RESULTS.md, "Polling on the device").
  bool device_poll = false;
  // While the warp holds at most this many connections, the lanes with nothing to move
  // join the calls of those that receive (or send) with zero-byte asks of their own, which
  // the host answers at once. Lanes in one call copy its bytes together
  // (hostcall::internal::group_copy), so one connection's 4 KiB comes out of the host's
  // buffer in two rounds of loads, not 32. Under load the host's service thread is the
  // limit and every helper is one more request for it, so with more connections nobody
  // helps. 0 turns it off.
  uint32_t copy_help_max_conns = 4;
  // ... and only when a lane moves at least this many bytes (for a receive: its
  // connection's last receive brought that many). On the H100 helpers cost more than
  // they saved on 64-byte messages (bench/RESULTS.md).
  uint32_t copy_help_bytes = 512;
};

// Per-warp counters, written by lane 0 only; the host reads them after the kernel ends
// (and, racy but harmless, while it runs, for progress lines).
struct EchoCounters {
  uint64_t accepted = 0;
  uint64_t closed = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint64_t reads = 0;    // recv calls that returned bytes
  uint64_t passes = 0;   // event-loop passes
  int64_t error = 0;     // first fatal error (-errno) of this warp's listener, 0 if none
  int64_t open = 0;      // connections open when the warp stopped
};

// One connection slot. `fd` < 0: free. `len` bytes of the buffer are waiting to be sent
// from `off`; while len > off the connection waits for POLLOUT.
struct EchoConn {
  int fd;
  uint32_t len;
  uint32_t off;
  uint32_t last_in;  // bytes of its last receive: what the next one is likely to bring
};

// What one warp keeps between passes, in device memory.
struct EchoWarp {
  int listener;
  int device_poll;     // 1: the listener has kSoPollOnDevice
  uint32_t open;
  uint32_t nready;
  uint32_t nfree;
  uint32_t spin_left;  // busy passes left before the warp waits in poll again
  EchoCounters counters;
  EchoConn conn[kMaxConnsPerWarp];
  uint16_t ready[kMaxConnsPerWarp];   // slots with events, from this pass's poll
  uint16_t free_slots[32];            // up to 32 free slots, for this pass's accepts
  int16_t accepted_slot[32];          // lane i's accept lands in this slot (-1: none)
  pollfd pfd[kMaxConnsPerWarp + 1];   // [0] listener, [1 + k] the k-th polled connection
  uint16_t pfd_slot[kMaxConnsPerWarp + 1];
};

// The kernel's arguments: plain pointers and values, copied into the launch.
struct EchoView {
  EchoWarp* warps;
  uint8_t* buffers;            // warps * conns_per_warp * buffer_bytes
  // Mapped host memory: word 0 non-zero asks every warp to end; word 1 + w is warp w's
  // listener: 0 not yet, 1 listening (2: and polling on the device), or -errno (as int32)
  // when it could not listen.
  // Read and written with system-scope atomics: the host and the kernel share them.
  uint32_t* flags;
  EchoConfig cfg;
  uint32_t nwarps;
};

namespace internal {

GPUSOCK_HD inline bool stop_requested(const EchoView& v) {
  // Acquire, system scope: the host's release store of the stop word comes over PCIe.
  return AtomicRef<uint32_t, Scope::kSystem>(v.flags[0]).load(Order::kAcquire) != 0;
}

// Lane 0: the warp's listening socket. Returns the descriptor or -errno.
GPUSOCK_HD inline int open_listener(const EchoConfig& cfg) {
  int fd = static_cast<int>(raw::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0));
  if (fd < 0) return fd;
  int one = 1;
  raw::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  int r = raw::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(cfg.port);
  a.sin_addr.s_addr = cfg.addr_be;
  if (r == 0) r = raw::bind(fd, reinterpret_cast<const sockaddr*>(&a), sizeof a);
  if (r == 0) r = raw::listen(fd, cfg.backlog);
  if (r < 0) {
    raw::close(fd);
    return r;
  }
  return fd;
}

// Whether this lane makes the round's recv (or send) call: it does when it has bytes to
// move (`want`), and so does every other lane when `help` (the warp holds few
// connections) and one lane with bytes has enough to be `worth` helping
// (EchoConfig::copy_help_max_conns, copy_help_bytes). *fd is the descriptor to call on:
// a helper asks the first worker's for zero bytes. Every lane of `all` must call.
// On the cpu device no lane helps: there each lane copies its own bytes anyway. `help`
// is the same on every lane (it comes from the warp's connection count), so the early
// return below leaves no lane behind at the ballots.
GPUSOCK_HD inline bool ride_along(uint32_t all, bool want, bool worth, int own_fd, bool help, int* fd) {
  if (!is_gpu() || !help) {
    *fd = own_fd;
    return want;
  }
  const uint32_t workers = warp::ballot(all, want);
  if (workers == 0) return false;
  const uint32_t worth_help = warp::ballot(all, want && worth);
  const int first = warp::shfl(all, own_fd, lowest_bit(workers));
  *fd = want ? own_fd : first;
  return want || (help && worth_help != 0);
}

}  // namespace internal

// The kernel. Launch it with whole warps (blockDim.x a multiple of 32); every warp serves
// until stop is set, then closes its connections and its listener.
struct EchoServer {
  GPUSOCK_HD void operator()(EchoView v) const {
    const uint64_t wid = global_warp_id();
    if (wid >= v.nwarps) return;
    const uint32_t lane = warp::lane_id();
    const uint32_t all = warp::existing_mask();
    const uint32_t cap = v.cfg.conns_per_warp;
    EchoWarp& w = v.warps[wid];
    uint8_t* bufs = v.buffers + wid * static_cast<uint64_t>(cap) * v.cfg.buffer_bytes;

    if (lane == 0) {
      w.listener = internal::open_listener(v.cfg);
      if (w.listener < 0) w.counters.error = w.listener;
      w.device_poll = 0;
      if (w.listener >= 0 && v.cfg.device_poll) {
        // Where the backend keeps no readiness words this fails, and the warp polls
        // through the host.
        int one = 1;
        w.device_poll = raw::setsockopt(w.listener, net::kSolGpusock, net::kSoPollOnDevice, &one, sizeof one) == 0;
      }
      // Tell the host (a PCIe write, once).
      AtomicRef<uint32_t, Scope::kSystem>(v.flags[1 + wid])
          .store(w.listener < 0 ? static_cast<uint32_t>(w.listener) : 1u + (w.device_poll ? 1u : 0u), Order::kRelease);
      for (uint32_t i = 0; i < cap; ++i) w.conn[i] = {-1, 0, 0};
      w.open = 0;
    }
    warp::sync(all);
    if (w.listener < 0) return;

    const bool device_poll = w.device_poll != 0;
    const uint32_t below = (1u << lane) - 1;  // lanes under this one, for compaction
    for (;;) {
      // 1. poll, then the ready list and the free list for this pass. The warp builds
      // each list together, 32 slots a round (a ballot places each lane's entry): one
      // lane walking 256 slots in device memory took tens of microseconds a pass.
      int stop = lane == 0 && internal::stop_requested(v) ? 1 : 0;
      stop = warp::shfl(all, stop, 0);
      if (stop) break;
      const uint32_t open = w.open;
      uint32_t n = 1;  // entry 0: the listener
      if (lane == 0) {
        w.pfd[0] = {w.listener, static_cast<short>(open < cap ? POLLIN : 0), 0};
        w.pfd_slot[0] = 0;
      }
      for (uint32_t base = 0; base < cap && n - 1 < open; base += 32) {
        const uint32_t i = base + lane;
        const EchoConn c = i < cap ? w.conn[i] : EchoConn{-1, 0, 0};
        const uint32_t m = warp::ballot(all, c.fd >= 0);
        if (c.fd >= 0) {
          const uint32_t k = n + popcount(m & below);
          w.pfd[k] = {c.fd, static_cast<short>(c.len > c.off ? POLLOUT : POLLIN), 0};
          w.pfd_slot[k] = static_cast<uint16_t>(i);
        }
        n += popcount(m);
      }
      // Busy (bytes arrived within the last spin_passes passes): skip the poll and try
      // every connection; the listener is looked at every 16th busy pass. Measured on
      // the H100 (bench/RESULTS.md): under load this beats receiving only what a poll
      // on the device reported, since each receive call then carries more connections.
      const bool busy = w.spin_left > 0;
      const bool try_all = busy && (w.counters.passes & 15) != 0;
      warp::sync(all);
      uint32_t nready = 0, nfree = 0;
      if (try_all) {
        for (uint32_t k0 = 1; k0 < n; k0 += 32) {
          if (k0 + lane < n) w.ready[k0 - 1 + lane] = w.pfd_slot[k0 + lane];
        }
        nready = n - 1;
      } else {
        // The whole warp reads the readiness words (or lane 0 makes the poll hostcall).
        const int timeout = busy ? 0 : v.cfg.poll_ms;
        int r = 0;
        if (device_poll) {
          r = raw::warp_poll(all, w.pfd, n, timeout);
        } else {
          if (lane == 0) r = raw::poll(w.pfd, n, timeout);
          r = warp::shfl(all, r, 0);
          warp::sync(all);
        }
        if (r == -ESHUTDOWN) break;
        if (r > 0) {
          for (uint32_t k0 = 1; k0 < n; k0 += 32) {
            const uint32_t k = k0 + lane;
            const bool ready = k < n && w.pfd[k].revents != 0;
            const uint32_t m = warp::ballot(all, ready);
            if (ready) w.ready[nready + popcount(m & below)] = w.pfd_slot[k];
            nready += popcount(m);
          }
          if ((w.pfd[0].revents & POLLIN) != 0) {
            for (uint32_t base = 0; base < cap && nfree < 32; base += 32) {
              const uint32_t i = base + lane;
              const bool free = i < cap && w.conn[i].fd < 0;
              const uint32_t m = warp::ballot(all, free);
              const uint32_t pos = nfree + popcount(m & below);
              if (free && pos < 32) w.free_slots[pos] = static_cast<uint16_t>(i);
              nfree = nfree + popcount(m) < 32 ? nfree + popcount(m) : 32;
            }
          }
        }
      }
      if (lane == 0) {
        w.nready = nready;
        w.nfree = nfree;
        if (busy) --w.spin_left;
        ++w.counters.passes;
      }
      warp::sync(all);

      // 2. accept: lane i takes free slot i.
      if (lane < nfree) {
        int fd = static_cast<int>(raw::accept4(w.listener, nullptr, nullptr, SOCK_NONBLOCK));
        const uint16_t slot = w.free_slots[lane];
        w.accepted_slot[lane] = fd >= 0 ? static_cast<int16_t>(slot) : int16_t{-1};
        if (fd >= 0) {
          // Replies go out as soon as they are written (lanes set it together: one call).
          int one = 1;
          raw::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          w.conn[slot] = {fd, 0, 0};
        }
      }
      warp::sync(all);
      if (lane == 0) {
        for (uint32_t i = 0; i < nfree; ++i) {
          if (w.accepted_slot[i] >= 0) {
            ++w.open;
            ++w.counters.accepted;
          }
        }
      }

      // 3. recv then send, 32 ready connections per round.
      uint32_t in = 0, out = 0, reads = 0, closed = 0;
      const bool help = w.open <= v.cfg.copy_help_max_conns;
      for (uint32_t base = 0; base < nready; base += 32) {
        const bool mine = base + lane < nready;
        const uint32_t slot = mine ? w.ready[base + lane] : 0;
        EchoConn* c = mine ? &w.conn[slot] : nullptr;
        uint8_t* buf = bufs + static_cast<uint64_t>(slot) * v.cfg.buffer_bytes;
        bool drop = false;
        // Every lane reaches each call together, so the lanes that receive share one
        // hostcall, and while the warp holds few connections the others ride along
        // (copy_help_max_conns).
        const bool want_in = mine && c->len == c->off;
        int fd = 0;
        const bool big_in = want_in && c->last_in >= v.cfg.copy_help_bytes;
        if (internal::ride_along(all, want_in, big_in, mine ? c->fd : -1, help, &fd)) {
          int64_t r = raw::recv(fd, want_in ? buf : nullptr, want_in ? v.cfg.buffer_bytes : 0, MSG_DONTWAIT);
          if (!want_in) {
            // a helper: nothing asked, nothing to keep
          } else if (r > 0) {
            c->len = c->last_in = static_cast<uint32_t>(r);
            c->off = 0;
            in += static_cast<uint32_t>(r);
            ++reads;
          } else if (r != -EAGAIN) {
            drop = true;  // 0: the client closed; < 0: the connection failed
          }
        }
        const bool want_out = mine && !drop && c->len > c->off;
        const bool big_out = want_out && c->len - c->off >= v.cfg.copy_help_bytes;
        if (internal::ride_along(all, want_out, big_out, mine ? c->fd : -1, help, &fd)) {
          int64_t r = raw::send(fd, want_out ? buf + c->off : nullptr, want_out ? c->len - c->off : 0,
                                MSG_DONTWAIT | MSG_NOSIGNAL);
          if (!want_out) {
            // a helper
          } else if (r > 0) {
            c->off += static_cast<uint32_t>(r);
            out += static_cast<uint32_t>(r);
            if (c->off == c->len) c->len = c->off = 0;
          } else if (r != -EAGAIN) {
            drop = true;
          }
        }
        if (drop) {
          raw::close(c->fd);
          *c = {-1, 0, 0};
          ++closed;
        }
      }
      // Lane 0 keeps the counters: sum the lanes' parts (one exchange each).
      if (nready > 0) {
        uint32_t t_in = 0, t_out = 0, t_reads = 0, t_closed = 0;
        warp::exclusive_sum(all, static_cast<uint32_t>(in), t_in);
        warp::exclusive_sum(all, static_cast<uint32_t>(out), t_out);
        warp::exclusive_sum(all, static_cast<uint32_t>(reads), t_reads);
        warp::exclusive_sum(all, static_cast<uint32_t>(closed), t_closed);
        if (lane == 0) {
          if (t_in > 0) w.spin_left = v.cfg.spin_passes;
          w.counters.bytes_in += t_in;
          w.counters.bytes_out += t_out;
          w.counters.reads += t_reads;
          w.counters.closed += t_closed;
          w.open -= t_closed;
        }
      }
      warp::sync(all);
    }

    // Stop: every lane closes its share of the connections, lane 0 the listener.
    warp::sync(all);
    for (uint32_t i = lane; i < cap; i += 32) {
      if (w.conn[i].fd >= 0) raw::close(w.conn[i].fd);
    }
    if (lane == 0) {
      w.counters.open = w.open;
      raw::close(w.listener);
    }
  }
};

// Host side: the memory one server launch needs, and its stop switch.
class EchoState {
 public:
  // Returns the state for `nwarps` warps, or EINVAL (bad config), ENOMEM.
  static Result<std::unique_ptr<EchoState>> create(Runtime& rt, uint32_t nwarps, const EchoConfig& cfg) {
    if (nwarps == 0 || cfg.conns_per_warp == 0 || cfg.conns_per_warp > kMaxConnsPerWarp || cfg.buffer_bytes == 0 ||
        cfg.conns_per_warp + 1 > net::kMaxPollFds) {
      return Status(EINVAL, "echo: need warps > 0, 0 < conns_per_warp <= 1024, buffer_bytes > 0");
    }
    auto warps = DeviceBuffer<EchoWarp>::create(rt, nwarps);
    if (!warps.ok()) return warps.status();
    auto bufs = DeviceBuffer<uint8_t>::create(rt, uint64_t{nwarps} * cfg.conns_per_warp * cfg.buffer_bytes);
    if (!bufs.ok()) return bufs.status();
    auto stop = rt.mapped_alloc(sizeof(uint32_t) * (1 + uint64_t{nwarps}));
    if (!stop.ok()) return stop.status();
    return std::unique_ptr<EchoState>(
        new EchoState(rt, std::move(*warps), std::move(*bufs), stop.value(), nwarps, cfg));
  }
  ~EchoState() { rt_.mapped_free(stop_.host); }
  EchoState(const EchoState&) = delete;
  EchoState& operator=(const EchoState&) = delete;

  EchoView view() const {
    return {warps_.data(), bufs_.data(), static_cast<uint32_t*>(stop_.device), cfg_, nwarps_};
  }
  // Asks every warp to close its connections and end (seen within poll_ms).
  void request_stop() { __atomic_store_n(static_cast<uint32_t*>(stop_.host), 1u, __ATOMIC_RELEASE); }
  // How many warps listen (> 0 each), or the first warp's error (-errno); 0 while some
  // warps have not tried yet.
  int listening() const {
    uint32_t* f = static_cast<uint32_t*>(stop_.host);
    int n = 0;
    for (uint32_t i = 0; i < nwarps_; ++i) {
      const int32_t x = static_cast<int32_t>(__atomic_load_n(&f[1 + i], __ATOMIC_ACQUIRE));
      if (x < 0) return x;
      if (x == 0) return 0;
      ++n;
    }
    return n;
  }
  // Whether every warp polls on the device (valid once listening() > 0).
  bool polls_on_device() const {
    uint32_t* f = static_cast<uint32_t*>(stop_.host);
    for (uint32_t i = 0; i < nwarps_; ++i) {
      if (__atomic_load_n(&f[1 + i], __ATOMIC_ACQUIRE) != 2u) return false;
    }
    return true;
  }
  // Every warp's counters (a consistent copy once the kernel has ended).
  std::vector<EchoCounters> counters() const {
    std::vector<EchoWarp> w = warps_.to_host();
    std::vector<EchoCounters> out;
    for (const EchoWarp& x : w) out.push_back(x.counters);
    return out;
  }

 private:
  EchoState(Runtime& rt, DeviceBuffer<EchoWarp> w, DeviceBuffer<uint8_t> b, Runtime::Mapped stop, uint32_t n,
            const EchoConfig& cfg)
      : rt_(rt), warps_(std::move(w)), bufs_(std::move(b)), stop_(stop), nwarps_(n), cfg_(cfg) {}
  Runtime& rt_;
  DeviceBuffer<EchoWarp> warps_;
  DeviceBuffer<uint8_t> bufs_;
  Runtime::Mapped stop_;
  uint32_t nwarps_;
  EchoConfig cfg_;
};

}  // namespace gpusock::examples
