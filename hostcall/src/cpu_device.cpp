// The cpu device: the CUDA execution model on host threads. Each lane of a warp is a
// real thread, so warp-collective code (convergence, shuffles, ballots, warp barriers)
// runs for real; see docs/architecture.md, "How the cpu device emulates a warp".
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "core.hpp"
#include "gpusock/hostcall/internal/cpu_exec.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "launch_state.hpp"

namespace gpusock::internal {

namespace {
thread_local LaneContext* tls_lane = nullptr;

// How long converging lanes wait for the rest of the warp before the lanes present
// proceed on their own, as diverged lanes would on a GPU.
constexpr auto kConvergeWait = std::chrono::milliseconds(10);
constexpr size_t kLaneStackBytes = 1u << 20;
}  // namespace

LaneContext* current_lane() { return tls_lane; }

// ---- aborted launches -----------------------------------------------------------------

namespace {
// Thrown to stop a lane of an aborted launch; caught only by lane_main(). Not derived from
// std::exception, so kernel code that catches std::exception does not swallow it.
struct LaneAbort {};
}  // namespace

struct CpuLaunch : LaunchState, std::enable_shared_from_this<CpuLaunch> {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t blocks_left = 0;
  bool done = false;  // every block finished and, after an abort, the runtime took back
                      // what the launch held
  Status result;
  uint32_t id = 0;
  // Set once by abort(); every lane of the launch reads it at its stop points (relaxed:
  // a lane that sees it late only stops later; the status is read under mu).
  std::atomic<bool> aborted{false};

  bool wait(std::chrono::nanoseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu);
    if (timeout.count() < 0) {
      cv.wait(lock, [&] { return done; });
      return true;
    }
    return cv.wait_for(lock, timeout, [&] { return done; });
  }
  Status status() override {
    std::lock_guard<std::mutex> lock(mu);
    return result;
  }
  // Records the launch's first failure; later ones are dropped.
  void fail(Status s) {
    std::lock_guard<std::mutex> lock(mu);
    if (result.ok()) result = std::move(s);
  }
  // Records why (unless an earlier failure was recorded) and stops the whole grid.
  void abort(Status s) {
    fail(std::move(s));
    aborted.store(true, std::memory_order_release);
  }
};

bool cpu_lane_aborted() {
  LaneContext* l = tls_lane;
  return l != nullptr && l->launch != nullptr && l->launch->aborted.load(std::memory_order_relaxed);
}

namespace {
thread_local int tls_stop_holds = 0;  // live LaneStopHold objects on this thread
}  // namespace

void cpu_hold_lane_stop(int delta) { tls_stop_holds += delta; }

bool cpu_lane_waits_end() {
  return cpu_lane_aborted() && std::uncaught_exceptions() == 0 && tls_stop_holds == 0;
}

bool cpu_lane_stop() {
  if (!cpu_lane_aborted()) return false;
  // Throwing while another exception unwinds the lane, or out of a destructor that holds
  // a LaneStopHold, would terminate the process: such a call fails fast instead.
  if (std::uncaught_exceptions() != 0 || tls_stop_holds > 0) return true;
  throw LaneAbort{};
}

void cpu_trap() {
  LaneContext* l = tls_lane;
  if (l == nullptr || l->launch == nullptr) {
    std::fprintf(stderr, "gpusock::trap() called outside a kernel: aborting the process\n");
    std::abort();
  }
  auto d = [](Dim3 v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
  };
  l->launch->abort(Status(EIO, "kernel aborted: gpusock::trap() in block " + d(l->block_idx) + " thread " +
                                   d(l->thread_idx)));
  throw LaneAbort{};
}

void cpu_note_claim(uint32_t slot, uint32_t staging_first, uint32_t staging_count) {
  LaneContext* l = tls_lane;
  if (l == nullptr || l->claims == nullptr) return;
  // Relaxed: the record is read only after the launch's lanes have all stopped (through
  // the launch's mutex), or by this launch's own lanes.
  ClaimRecord& r = l->claims[slot];
  std::atomic_ref<uint32_t>(r.staging_first).store(staging_first, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(r.staging_count).store(staging_count, std::memory_order_relaxed);
  std::atomic_ref<uint32_t>(r.launch).store(l->launch_id, std::memory_order_relaxed);
}

void cpu_clear_claim(uint32_t slot) {
  LaneContext* l = tls_lane;
  if (l == nullptr || l->claims == nullptr) return;
  std::atomic_ref<uint32_t>(l->claims[slot].launch).store(0, std::memory_order_relaxed);
}

// ---- CpuWarp ------------------------------------------------------------------------

class CpuWarp {
 public:
  explicit CpuWarp(uint32_t live) : live_(live) {}

  // A lane's thread began running the kernel. Until every lane has, converging lanes
  // wait for the rest without a time bound: a lane not yet started is not a lane busy
  // elsewhere.
  void start_lane(uint32_t lane) {
    std::lock_guard<std::mutex> lock(mu_);
    started_ |= 1u << lane;
    if ((started_ & live_) == live_) all_started_ = std::chrono::steady_clock::now();
    cv_.notify_all();
  }

  // Converges the lanes that reach this call site with the same key. A lane of an
  // aborted launch stops here instead (every hostcall and active_mask() begins here).
  uint32_t converge(uint32_t lane, uint64_t site, uint64_t key) {
    cpu_lane_stop();
    const uint32_t bit = 1u << lane;
    std::unique_lock<std::mutex> lock(mu_);
    site_[lane] = site;
    key_[lane] = key;
    group_[lane] = 0;
    converging_ |= bit;
    waiting_ |= bit;
    maybe_converge();
    const auto entered = std::chrono::steady_clock::now();
    while (group_[lane] == 0) {
      if ((started_ & live_) != live_) {
        cv_.wait(lock);
        continue;
      }
      const auto deadline = std::max(entered, all_started_) + kConvergeWait;
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && group_[lane] == 0) {
        form_groups();  // the rest of the warp is busy elsewhere: go without it
      }
    }
    return group_[lane];
  }

  // Barrier over `mask` that also exchanges one word per lane: out[l] receives lane l's
  // `value` for every l in mask (out may be null). One rendezvous per exchange: values
  // travel with the barrier, so no second barrier is needed to protect a shared array.
  void sync(uint32_t lane, uint32_t mask, uint64_t value = 0, uint64_t* out = nullptr) {
    const uint32_t bit = 1u << lane;
    std::unique_lock<std::mutex> lock(mu_);
    Barrier* b = find_barrier(mask);
    b->arrived |= bit;
    b->values[lane] = value;
    if (barrier_complete(*b)) {
      if (out != nullptr) copy_values(*b, out);
      release(*b);
      return;
    }
    waiting_ |= bit;
    const uint64_t seen = released_[lane];
    maybe_converge();
    cv_.wait(lock, [&] { return released_[lane] != seen; });
    if (out != nullptr) {
      for (uint32_t m = mask; m != 0; m &= m - 1) {
        uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
        out[l] = delivered_[lane][l];
      }
    }
  }

  void exit_lane(uint32_t lane) {
    std::lock_guard<std::mutex> lock(mu_);
    live_ &= ~(1u << lane);
    // A lane that exits without ever starting (no thread for it) may complete the set.
    if ((started_ & live_) == live_ && all_started_ == std::chrono::steady_clock::time_point{}) {
      all_started_ = std::chrono::steady_clock::now();
    }
    // Exited lanes count as arrived at every barrier, as if they were not in its mask.
    for (size_t i = 0; i < barriers_.size();) {
      if (barrier_complete(barriers_[i])) {
        release(barriers_[i]);  // erases it
      } else {
        ++i;
      }
    }
    maybe_converge();
    cv_.notify_all();
  }

 private:
  struct Barrier {
    uint32_t mask;
    uint32_t arrived;
    uint64_t values[32];
  };

  Barrier* find_barrier(uint32_t mask) {
    for (auto& b : barriers_) {
      if (b.mask == mask) return &b;
    }
    barriers_.push_back({mask, 0, {}});
    return &barriers_.back();
  }
  bool barrier_complete(const Barrier& b) const { return ((b.arrived | ~live_) & b.mask) == b.mask; }
  void copy_values(const Barrier& b, uint64_t* out) const {
    for (uint32_t m = b.arrived; m != 0; m &= m - 1) {
      uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
      out[l] = b.values[l];
    }
  }
  void release(Barrier& b) {
    for (uint32_t m = b.arrived; m != 0; m &= m - 1) {
      uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
      copy_values(b, delivered_[l]);
      ++released_[l];
    }
    waiting_ &= ~b.arrived;
    barriers_.erase(barriers_.begin() + (&b - barriers_.data()));
    cv_.notify_all();
  }
  // Every live lane is waiting in some warp operation: nobody else can join, so the
  // lanes converging now form their groups.
  void maybe_converge() {
    if (converging_ != 0 && (waiting_ & live_) == live_) form_groups();
  }
  void form_groups() {
    for (uint32_t m = converging_; m != 0; m &= m - 1) {
      uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
      uint32_t g = 0;
      for (uint32_t n = converging_; n != 0; n &= n - 1) {
        uint32_t o = static_cast<uint32_t>(__builtin_ctz(n));
        if (site_[o] == site_[l] && key_[o] == key_[l]) g |= 1u << o;
      }
      group_[l] = g;
    }
    waiting_ &= ~converging_;
    converging_ = 0;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t live_;
  uint32_t started_ = 0;
  std::chrono::steady_clock::time_point all_started_{};
  uint32_t waiting_ = 0;
  uint32_t converging_ = 0;
  uint64_t site_[32] = {};
  uint64_t key_[32] = {};
  uint32_t group_[32] = {};
  uint64_t released_[32] = {};
  uint64_t delivered_[32][32] = {};
  std::vector<Barrier> barriers_;
};

// ---- CpuBlock -----------------------------------------------------------------------

class CpuBlock {
 public:
  CpuBlock(uint32_t threads, Dim3 idx) : idx_(idx), live_(threads), remaining_(threads) {
    for (uint32_t w = 0; w * 32 < threads; ++w) {
      uint32_t n = std::min<uint32_t>(32, threads - w * 32);
      warps_.push_back(std::make_unique<CpuWarp>(n == 32 ? 0xffffffffu : ((1u << n) - 1)));
    }
  }
  CpuWarp* warp(uint32_t i) { return warps_[i].get(); }
  Dim3 idx() const { return idx_; }
  uint32_t warps() const { return static_cast<uint32_t>(warps_.size()); }

  void sync() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ == live_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
  }
  // Returns true for the last lane of the block to exit.
  bool exit_lane() {
    std::lock_guard<std::mutex> lock(mu_);
    --live_;
    if (arrived_ > 0 && arrived_ == live_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    }
    return --remaining_ == 0;
  }

 private:
  Dim3 idx_;
  std::vector<std::unique_ptr<CpuWarp>> warps_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint32_t live_;
  uint32_t arrived_ = 0;
  uint64_t gen_ = 0;
  uint32_t remaining_;
};

// ---- warp operations called from portable code ----------------------------------------

uint32_t cpu_active_mask(uint64_t site) {
  LaneContext* l = tls_lane;
  return l->warp->converge(l->lane, site, 0);
}
uint32_t cpu_converge_match(uint64_t site, uint64_t key) {
  LaneContext* l = tls_lane;
  return l->warp->converge(l->lane, site, key);
}
void cpu_sync_warp(uint32_t mask) { tls_lane->warp->sync(tls_lane->lane, mask); }
void cpu_all_gather(uint32_t mask, uint64_t value, uint64_t* out) {
  tls_lane->warp->sync(tls_lane->lane, mask, value, out);
}
uint64_t cpu_shfl(uint32_t mask, uint64_t value, uint32_t src_lane) {
  uint64_t all[32];
  cpu_all_gather(mask, value, all);
  return all[src_lane];
}
uint32_t cpu_ballot(uint32_t mask, bool pred) {
  uint64_t all[32];
  cpu_all_gather(mask, pred ? 1 : 0, all);
  uint32_t r = 0;
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
    if (all[l] != 0) r |= 1u << l;
  }
  return r;
}
uint32_t cpu_match_any(uint32_t mask, uint64_t value) {
  uint64_t all[32];
  cpu_all_gather(mask, value, all);
  uint32_t r = 0;
  for (uint32_t m = mask; m != 0; m &= m - 1) {
    uint32_t l = static_cast<uint32_t>(__builtin_ctz(m));
    if (all[l] == value) r |= 1u << l;
  }
  return r;
}
void cpu_sync_block() { tls_lane->block->sync(); }

// ---- lane threads -------------------------------------------------------------------

// Lane threads are kept and reused: creating a thread costs from tens of microseconds to
// half a millisecond on a virtual machine, and lanes that start far apart would miss
// each other at their first convergence point. The pool is process-wide, so runtimes
// created one after another (as tests do) share it; it grows to the most lanes ever
// resident at once and its threads park when idle.
class LanePool {
 public:
  static LanePool& instance() {
    static LanePool* pool = new LanePool();  // never destroyed: parked threads outlive main
    return *pool;
  }

  // Runs job(arg) on a pooled thread. Returns false, without running it, if no thread
  // could be had (the process is out of threads or memory).
  bool run(void (*job)(void*), void* arg) {
    Worker* w = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        w = idle_.back();
        idle_.pop_back();
      }
    }
    if (w == nullptr) w = spawn();
    if (w == nullptr) return false;
    {
      std::lock_guard<std::mutex> lock(w->mu);
      w->job = job;
      w->arg = arg;
    }
    w->cv.notify_one();
    return true;
  }

 private:
  struct Worker {
    std::mutex mu;
    std::condition_variable cv;
    void (*job)(void*) = nullptr;
    void* arg = nullptr;
  };

  Worker* spawn() {
    auto* w = new Worker();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, kLaneStackBytes);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t tid;
    int rc = EAGAIN;
    // At the thread limit, wait a little for other lanes to finish. After one failure
    // every later spawn gives up at once, so a launch too large for the process fails
    // in bounded time instead of retrying lane by lane.
    const int tries_allowed = spawn_failed_.load(std::memory_order_relaxed) ? 1 : 100;
    for (int tries = 0; tries < tries_allowed && (rc = pthread_create(&tid, &attr, &LanePool::main, w)) == EAGAIN;
         ++tries) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    spawn_failed_.store(rc != 0, std::memory_order_relaxed);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
      std::fprintf(stderr, "gpusock: cannot start a cpu-device lane thread: %s\n", std::strerror(rc));
      delete w;
      return nullptr;
    }
    return w;
  }

  static void* main(void* arg) {
    auto* w = static_cast<Worker*>(arg);
    for (;;) {
      void (*job)(void*);
      void* job_arg;
      {
        std::unique_lock<std::mutex> lock(w->mu);
        w->cv.wait(lock, [&] { return w->job != nullptr; });
        job = w->job;
        job_arg = w->arg;
        w->job = nullptr;
      }
      job(job_arg);
      std::lock_guard<std::mutex> lock(instance().mu_);
      instance().idle_.push_back(w);
    }
    return nullptr;
  }

  std::mutex mu_;
  std::vector<Worker*> idle_;
  std::atomic<bool> spawn_failed_{false};
};

// ---- scheduler and launches ---------------------------------------------------------

class CpuBackend;

class CpuBackend : public DeviceBackend {
 public:
  explicit CpuBackend(const RuntimeOptions& o) : max_warps_(std::max<uint32_t>(1, o.cpu_resident_warps)) {}

  DeviceKind kind() const override { return DeviceKind::kCpu; }
  std::string name() const override {
    return "cpu device (" + std::to_string(max_warps_) + " resident warps, lanes are host threads)";
  }
  Status alloc_mapped(size_t bytes, void** host, void** dev) override {
    Status s = alloc_device(bytes, host);
    *dev = *host;
    return s;
  }
  void free_mapped(void* host) override { std::free(host); }
  Status alloc_device(size_t bytes, void** dev) override {
    size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(4096, rounded);
    if (p == nullptr) return {ENOMEM, "cannot allocate " + std::to_string(bytes) + " bytes"};
    std::memset(p, 0, rounded);
    *dev = p;
    return {};
  }
  void free_device(void* dev) override { std::free(dev); }
  Status copy_to_device(void* dev, const void* host, size_t bytes) override {
    std::memcpy(dev, host, bytes);
    return {};
  }
  Status copy_from_device(void* host, const void* dev, size_t bytes) override {
    std::memcpy(host, dev, bytes);
    return {};
  }
  uint32_t max_resident_warps() const override { return max_warps_; }
  uint32_t sm_count() const override { return 1; }
  uint32_t threads_per_sm() const override { return 32; }
  uint32_t sm_ids() const override { return 1; }
  Status calibrate_clock(int64_t* mono, int64_t* real) override {
    // The cpu device's clock is CLOCK_MONOTONIC itself.
    timespec m, r;
    ::clock_gettime(CLOCK_MONOTONIC, &m);
    ::clock_gettime(CLOCK_REALTIME, &r);
    *mono = 0;
    *real = (static_cast<int64_t>(r.tv_sec) - m.tv_sec) * 1000000000 + (r.tv_nsec - m.tv_nsec);
    return {};
  }
  bool kernels_running() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return launches_ != 0;
  }
  bool wait_kernels(std::chrono::nanoseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return launches_ == 0; });
  }

  Result<std::shared_ptr<LaunchState>> launch(std::shared_ptr<Core> core, Dim3 grid, Dim3 block,
                                              std::function<void()> body) {
    const uint64_t threads = uint64_t{block.x} * block.y * block.z;
    const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
    if (threads == 0 || threads > 1024) return Status(EINVAL, "block must have 1..1024 threads");
    if (blocks == 0) return Status(EINVAL, "grid must have at least one block");
    const uint32_t warps = static_cast<uint32_t>((threads + 31) / 32);
    if (warps > max_warps_) {
      return Status(EINVAL, "block of " + std::to_string(warps) + " warps exceeds the cpu device's " +
                                std::to_string(max_warps_) + " resident warps");
    }
    auto l = std::make_shared<CpuLaunch>();
    static std::atomic<uint32_t> next_id{1};
    l->id = next_id.fetch_add(1, std::memory_order_relaxed);
    if (l->id == 0) l->id = next_id.fetch_add(1, std::memory_order_relaxed);  // 0 means "none"
    l->blocks_left = blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++launches_;
    }
    auto shared_body = std::make_shared<const std::function<void()>>(std::move(body));
    // The grid driver hands blocks out as residency allows, like a GPU's block scheduler.
    std::thread([this, core, l, shared_body, grid, block, warps] {
      for (uint32_t z = 0; z < grid.z; ++z)
        for (uint32_t y = 0; y < grid.y; ++y)
          for (uint32_t x = 0; x < grid.x; ++x) {
            {
              std::unique_lock<std::mutex> lock(mu_);
              cv_.wait(lock, [&] { return resident_ + warps <= max_warps_; });
              resident_ += warps;
            }
            // After an abort the rest of the grid never starts, as on a GPU.
            if (l->aborted.load(std::memory_order_acquire)) {
              finish_block(*core, *l, warps);
            } else {
              start_block(core, l, shared_body, grid, block, Dim3{x, y, z}, warps);
            }
          }
    }).detach();
    return std::shared_ptr<LaunchState>(l);
  }

 private:
  struct LaneStart {
    std::shared_ptr<Core> core;
    std::shared_ptr<CpuLaunch> launch;
    std::shared_ptr<CpuBlock> block;
    std::shared_ptr<const std::function<void()>> body;
    CpuBackend* backend;
    LaneContext ctx;
    uint32_t warps;
  };

  static void lane_main(void* arg) {
    std::unique_ptr<LaneStart> st(static_cast<LaneStart*>(arg));
    st->ctx.warp->start_lane(st->ctx.lane);
    tls_lane = &st->ctx;
    // A lane that throws aborts its launch, as a fault would on a GPU: the others stop
    // too, and the runtime takes back what the launch held.
    try {
      if (!st->launch->aborted.load(std::memory_order_acquire)) (*st->body)();
    } catch (const LaneAbort&) {
      // stopped by the abort; its cause is recorded already
    } catch (const std::exception& e) {
      st->launch->abort(Status(EIO, std::string("kernel aborted: a lane threw: ") + e.what()));
    } catch (...) {
      st->launch->abort(Status(EIO, "kernel aborted: a lane threw"));
    }
    tls_lane = nullptr;
    retire_lane(std::move(st));
  }

  // A lane is done (or never ran): it leaves its warp and block, and the block's last
  // lane reports the block finished.
  static void retire_lane(std::unique_ptr<LaneStart> st) {
    st->ctx.warp->exit_lane(st->ctx.lane);
    // Drop the block before reporting it finished, but keep the runtime (which owns the
    // backend) alive until finish_block() has returned.
    std::shared_ptr<Core> core = std::move(st->core);
    std::shared_ptr<CpuLaunch> launch = std::move(st->launch);
    CpuBackend* backend = st->backend;
    uint32_t warps = st->warps;
    bool last = st->block->exit_lane();
    st.reset();
    if (last) backend->finish_block(*core, *launch, warps);
  }

  void start_block(const std::shared_ptr<Core>& core, const std::shared_ptr<CpuLaunch>& l,
                   const std::shared_ptr<const std::function<void()>>& body, Dim3 grid, Dim3 block,
                   Dim3 idx, uint32_t warps) {
    const uint32_t threads = block.x * block.y * block.z;
    auto b = std::make_shared<CpuBlock>(threads, idx);
    for (uint32_t t = 0; t < threads; ++t) {
      auto* st = new LaneStart{core, l, b, body, this, {}, warps};
      st->ctx.warp = b->warp(t / 32);
      st->ctx.block = b.get();
      st->ctx.ctx = core->device_context();
      st->ctx.lane = t % 32;
      st->ctx.thread_idx = Dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      st->ctx.block_idx = idx;
      st->ctx.block_dim = block;
      st->ctx.grid_dim = grid;
      st->ctx.launch = l.get();
      st->ctx.launch_id = l->id;
      st->ctx.claims = core->claims();
      if (!LanePool::instance().run(&CpuBackend::lane_main, st)) {
        // No thread for this lane: it counts as exited at once, and the launch reports
        // the failure. Its warp-mates see it as absent rather than waiting for it.
        l->fail(Status(EAGAIN, "cpu device: cannot create a lane thread"));
        retire_lane(std::unique_ptr<LaneStart>(st));
      }
    }
  }

  // A block ended (or, after an abort, was skipped): its warps leave the device. The last
  // block ends the launch; after an abort the runtime first takes back what the launch
  // still held, so that Launch::wait() returns to a runtime whose pools are whole again.
  void finish_block(Core& core, CpuLaunch& l, uint32_t warps) {
    bool launch_done;
    {
      std::lock_guard<std::mutex> lock(l.mu);
      launch_done = --l.blocks_left == 0;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      resident_ -= warps;
    }
    cv_.notify_all();
    if (!launch_done) return;
    if (l.aborted.load(std::memory_order_acquire)) core.reclaim_launch(l.id);
    {
      std::lock_guard<std::mutex> lock(l.mu);
      l.done = true;
    }
    l.cv.notify_all();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --launches_;
    }
    cv_.notify_all();
  }

  const uint32_t max_warps_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint32_t resident_ = 0;
  uint32_t launches_ = 0;
};

std::unique_ptr<DeviceBackend> make_cpu_backend(const RuntimeOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

Result<std::shared_ptr<LaunchState>> cpu_launch(Runtime& rt, Dim3 grid, Dim3 block,
                                                std::function<void()> lane_body) {
  if (rt.is_shut_down()) return Status(ESHUTDOWN, "runtime is shut down");
  auto* cpu = dynamic_cast<CpuBackend*>(&rt.core().device());
  if (cpu == nullptr) return Status(ENODEV, "the runtime's device is not the cpu device");
  return cpu->launch(rt.core().self(), grid, block, std::move(lane_body));
}

Status no_cuda_in_this_unit() {
  return {ENODEV,
          "the runtime runs on cuda, but this kernel's translation unit was not compiled by nvcc "
          "with CUDA enabled: compile it as CUDA, or create the runtime with device = cpu"};
}

}  // namespace gpusock::internal

namespace gpusock {

Status Launch::wait() {
  s_->wait(std::chrono::nanoseconds(-1));
  return s_->status();
}

bool Launch::wait_for(std::chrono::nanoseconds timeout) { return s_->wait(timeout); }

}  // namespace gpusock
