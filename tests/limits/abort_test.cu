// A kernel that aborts (gpusock::trap()) while its calls are in flight: the runtime
// reports it, answers or drops those calls without touching memory it gave back, frees
// what the kernel held, and leaks no descriptor (docs/architecture.md, section 18.3). The
// same runtime then runs the next kernel with its whole slot pool, on the cpu device and
// on a GPU; the GPU cases skip, with the reason, where there is none.
//
// A fault on a GPU (here a raw `trap` instruction) is another matter: it loses the CUDA
// context, and the runtime reports itself failed (last test of this file, since nothing
// of CUDA works in this process after it).
#include <dirent.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/runtime.hpp"

namespace {

using gpusock::DeviceBuffer;
using gpusock::DeviceKind;
using gpusock::Runtime;
namespace hc = gpusock::hostcall;

constexpr uint32_t kOpHold = hc::kTestFirst + 0x30;  // deferred until the test answers
constexpr uint32_t kOpEcho = hc::kTestFirst + 0x31;  // arg0 * 3 + arg1
constexpr uint32_t kOpSum = hc::kTestFirst + 0x32;   // sum of the payload's bytes

// What each open descriptor of this process points at, from /proc/self/fd.
std::multiset<std::string> fd_targets() {
  std::multiset<std::string> out;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return out;
  const int self = ::dirfd(d);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.' || std::atoi(e->d_name) == self) continue;
    char buf[512];
    ssize_t n = ::readlinkat(self, e->d_name, buf, sizeof buf - 1);
    out.insert(n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("?"));
  }
  ::closedir(d);
  return out;
}

std::string describe(const std::multiset<std::string>& s) {
  std::map<std::string, int> m;
  for (auto& t : s) m[t.substr(0, t.find('['))]++;  // sockets, pipes and anon inodes by kind
  std::string r;
  for (auto& [k, v] : m) r += k + " x" + std::to_string(v) + "; ";
  return r;
}

GPUSOCK_HD inline void put(uint32_t* box, uint32_t i, uint32_t v) {
  gpusock::AtomicRef<uint32_t, gpusock::Scope::kSystem>(box[i]).store(v, gpusock::Order::kRelease);
}
GPUSOCK_HD inline void await(uint32_t* box, uint32_t i) {
  for (uint32_t n = 0; gpusock::AtomicRef<uint32_t, gpusock::Scope::kSystem>(box[i]).load(gpusock::Order::kAcquire) == 0; ++n) {
    gpusock::backoff(n);
  }
}

constexpr uint32_t kPayload = 64 * 1024;  // 16 staging pages

// Roles by global warp (blocks of 64 threads, two warps each):
//   0: lane 0 blocks in a kOpHold call (held by the host, no staging); the rest spin
//   1: lane 0 leaves two answered tickets unwaited and one kOpHold call with a 64 KiB
//      payload in flight (claimed by its handler: its staging run is in use), then spins
//   2: lane 0 waits a payload call with wait_keep_staging (slot and staging kept), spins
//   3: lane 0 traps once the host says so; the other lanes spin
//   other warps: spin
// Every thread that starts marks ran[tid]; calls record their results in res[tid].
struct Doomed {
  GPUSOCK_HD void operator()(uint32_t* box, const uint8_t* payload, int64_t* ran, int64_t* res) const {
    const uint64_t tid = gpusock::global_thread_id();
    const uint64_t warp = gpusock::global_warp_id();
    const uint32_t lane = gpusock::warp::lane_id();
    ran[tid] = 1;
    if (warp == 0 && lane == 0) {
      res[tid] = hc::call(kOpHold, tid);
      return;
    }
    if (warp == 1 && lane == 0) {
      hc::submit(kOpEcho, 1, 1);
      hc::submit(kOpEcho, 2, 2);
      hc::submit_with_payload(kOpHold, payload, kPayload, uint64_t{7});
      put(box, 1, 1);
    } else if (warp == 2 && lane == 0) {
      hc::Ticket t = hc::submit_with_payload(kOpSum, payload, kPayload);
      res[tid] = hc::wait_keep_staging(t);
      put(box, 2, 1);
    } else if (warp == 3 && lane == 0) {
      await(box, 0);
      gpusock::trap();
    }
    await(box, 9);  // never posted: only the abort ends these lanes
  }
};

// One lane takes every slot of the pool with try_submit, then waits on each ticket.
// out: {tickets taken, the error that ended it, wrong answers}.
struct UseEverySlot {
  GPUSOCK_HD void operator()(hc::Ticket* tickets, uint32_t max, int64_t* out) const {
    if (gpusock::global_thread_id() != 0) return;
    uint32_t n = 0;
    int64_t err = 0;
    while (n < max) {
      hc::Ticket t = hc::try_submit(kOpEcho, n, 1);
      if (t.slot == hc::kNoSlot) {
        err = t.error;
        break;
      }
      tickets[n++] = t;
    }
    int64_t bad = 0;
    for (uint32_t i = 0; i < n; ++i) bad += hc::wait(tickets[i]) != static_cast<int64_t>(i) * 3 + 1;
    out[0] = n;
    out[1] = err;
    out[2] = bad;
  }
};

struct Host {
  std::mutex mu;
  std::vector<hc::DeferredCall> held;

  void install(Runtime& rt) {
    ASSERT_TRUE(rt.register_handler(kOpHold, "hold", [this](hc::Call& c) {
                    std::lock_guard<std::mutex> lock(mu);
                    held.push_back(c.defer());
                  }).ok());
    ASSERT_TRUE(rt.register_handler(kOpEcho, "echo", [](hc::Call& c) {
                    c.for_each_lane([&](uint32_t l) { c.set_result(l, static_cast<int64_t>(c.arg(l, 0) * 3 + c.arg(l, 1))); });
                  }).ok());
    ASSERT_TRUE(rt.register_handler(kOpSum, "sum", [](hc::Call& c) {
                    c.for_each_lane([&](uint32_t l) {
                      std::span<const uint8_t> p;
                      int e = c.payload(l, 0, &p);
                      int64_t sum = 0;
                      for (uint8_t b : p) sum += b;
                      c.set_result(l, e != 0 ? e : sum);
                    });
                  }).ok());
  }
  size_t count() {
    std::lock_guard<std::mutex> lock(mu);
    return held.size();
  }
  // Answers every held call late; returns how many answers still reached a kernel.
  int answer_all() {
    std::lock_guard<std::mutex> lock(mu);
    int reached = 0;
    for (auto& d : held) {
      d.call().set_all(1);
      reached += d.complete();
    }
    held.clear();
    return reached;
  }
};

bool await_host(uint32_t* box, uint32_t i, std::chrono::seconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (std::atomic_ref<uint32_t>(box[i]).load(std::memory_order_acquire) == 0) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// Runs UseEverySlot on `rt`: every slot of the pool must be free and work.
void ExpectEverySlotWorks(Runtime& rt) {
  const uint32_t nslots = rt.slot_count();
  auto tickets = DeviceBuffer<hc::Ticket>::create(rt, nslots + 1);
  auto out = DeviceBuffer<int64_t>::create(rt, 3);
  ASSERT_TRUE(tickets.ok() && out.ok());
  auto k = gpusock::launch(rt, {1}, {32}, UseEverySlot{}, tickets->data(), nslots + 1, out->data());
  ASSERT_TRUE(k.ok()) << k.status().to_string();
  ASSERT_TRUE(k->wait_for(std::chrono::seconds(300))) << "the kernel did not finish";
  ASSERT_TRUE(k->wait().ok()) << k->wait().to_string();
  auto o = out->to_host();
  EXPECT_EQ(o[0], nslots) << "the whole pool is free";
  EXPECT_EQ(o[1], -EAGAIN);
  EXPECT_EQ(o[2], 0);
  EXPECT_EQ(rt.stats().slots_owned, 0u);
}

// Descriptors of the CUDA driver itself (/dev/nvidia*) come and go with contexts; what
// the runtime opens (sockets, eventfds, io_uring, pipes) must not.
std::multiset<std::string> non_driver(const std::multiset<std::string>& s) {
  std::multiset<std::string> r;
  for (auto& t : s) {
    if (t.rfind("/dev/nvidia", 0) != 0) r.insert(t);
  }
  return r;
}

constexpr const char* kNoGpu =
    "needs a GPU (no usable GPU here: cudaGetDeviceCount found none); the cpu-device case of this test runs instead";

gpusock::RuntimeOptions OptionsFor(DeviceKind kind) {
  gpusock::RuntimeOptions o;
  o.device = kind;
  o.cpu_resident_warps = 8;  // cpu: 4 blocks of 2 warps resident; the other 4 blocks wait
  o.slots_per_warp = 2;
  return o;
}

void TrapWithCallsInFlight(DeviceKind kind) {
  const gpusock::RuntimeOptions o = OptionsFor(kind);
  if (kind == DeviceKind::kCuda) {
    // The driver opens its own descriptors once; count from there.
    auto warm = Runtime::create(o);
    EXPECT_TRUE(warm.ok()) << warm.status().to_string();
  }
  const auto fds_before = non_driver(fd_targets());
  {
    auto rtr = Runtime::create(o);
    ASSERT_TRUE(rtr.ok()) << rtr.status().to_string();
    std::unique_ptr<Runtime> rt = std::move(rtr.value());
    Host host;
    host.install(*rt);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    {
      auto m = rt->mapped_alloc(4096);
      ASSERT_TRUE(m.ok());
      rt->mapped_free_at_exit(m->host);
      auto* box = static_cast<uint32_t*>(m->host);
      constexpr uint32_t kBlocks = 8, kThreads = 64;
      std::vector<uint8_t> bytes(kPayload);
      int64_t sum = 0;
      for (uint32_t i = 0; i < kPayload; ++i) sum += bytes[i] = static_cast<uint8_t>(i * 13 + 5);
      auto payload = DeviceBuffer<uint8_t>::create(*rt, kPayload);
      auto ran = DeviceBuffer<int64_t>::create(*rt, kBlocks * kThreads);
      auto res = DeviceBuffer<int64_t>::create(*rt, kBlocks * kThreads);
      ASSERT_TRUE(payload.ok() && ran.ok() && res.ok());
      ASSERT_TRUE(payload->from_host(bytes).ok());
      auto k = gpusock::launch(*rt, {kBlocks}, {kThreads}, Doomed{}, static_cast<uint32_t*>(m->device),
                               static_cast<const uint8_t*>(payload->data()), ran->data(), res->data());
      ASSERT_TRUE(k.ok()) << k.status().to_string();

      // Everything in flight: warp 0's call and warp 1's payload call held by the host,
      // warp 1's answered tickets and warp 2's kept staging unreleased.
      ASSERT_TRUE(await_host(box, 1, std::chrono::seconds(120)));
      ASSERT_TRUE(await_host(box, 2, std::chrono::seconds(120)));
      for (int i = 0; i < 120000 && host.count() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ASSERT_EQ(host.count(), 2u);
      gpusock::RuntimeStats st = rt->stats();
      EXPECT_EQ(st.slots_owned, 5u);  // warp 0: 1, warp 1: 3, warp 2: 1
      EXPECT_EQ(st.staging_pages_used, 2 * kPayload / hc::kStagingPageBytes);
      EXPECT_EQ(st.calls_in_flight, 2u);
      EXPECT_FALSE(k->wait_for(std::chrono::milliseconds(20)));

      std::atomic_ref<uint32_t>(box[0]).store(1, std::memory_order_release);  // trap
      ASSERT_TRUE(k->wait_for(std::chrono::seconds(120))) << "the aborted launch did not end";
      gpusock::Status s = k->wait();
      EXPECT_EQ(s.code(), EIO) << s.to_string();
      EXPECT_NE(s.message().find("aborted"), std::string::npos) << s.to_string();
      EXPECT_NE(s.message().find("trap"), std::string::npos) << s.to_string();
      EXPECT_NE(s.message().find("block (1,0,0) thread (32,0,0)"), std::string::npos) << s.to_string();

      // The launch's slots are back. Its held payload call's staging stays held while its
      // handler could still read it; nothing else does.
      st = rt->stats();
      EXPECT_EQ(st.slots_owned, 0u);
      EXPECT_EQ(st.calls_in_flight, 0u);
      EXPECT_EQ(st.staging_pages_used, kPayload / hc::kStagingPageBytes);
      EXPECT_EQ(st.reclaimed_slots, 5u);
      EXPECT_EQ(st.reclaimed_calls, 2u);

      // The held calls were answered at the abort: the late answers reach nobody, and the
      // last one gives the staging run back.
      EXPECT_EQ(host.answer_all(), 0);
      EXPECT_EQ(rt->stats().staging_pages_used, 0u);

      auto r = ran->to_host();
      auto v = res->to_host();
      if (kind == DeviceKind::kCpu) {
        // On a GPU all 8 blocks are resident from the start; KernelAbort.*BlocksStartedAfterATrap*
        // shows the same there with a grid larger than the GPU holds.
        for (uint32_t t = kThreads * 4; t < kBlocks * kThreads; ++t) {
          EXPECT_EQ(r[t], 0) << "thread " << t << " of a block that should never have started";
        }
      }
      EXPECT_EQ(v[0], -ECANCELED) << "the blocked call ends with the launch's abort";
      EXPECT_EQ(v[64], sum) << "warp 2's call was answered before the abort";

      // The same runtime runs the next kernel with the whole pool.
      ExpectEverySlotWorks(*rt);
      EXPECT_EQ(rt->stats().staging_pages_used, 0u);
    }
    EXPECT_TRUE(rt->health().ok()) << rt->health().to_string();
  }
  const auto fds_after = non_driver(fd_targets());
  EXPECT_EQ(fds_after, fds_before) << "before: " << describe(fds_before) << "\nafter: " << describe(fds_after);
}

TEST(KernelAbort, CpuTrapWithCallsInFlightIsReportedAndEverythingItHeldIsTakenBack) {
  TrapWithCallsInFlight(DeviceKind::kCpu);
}

TEST(KernelAbort, CudaTrapWithCallsInFlightIsReportedAndEverythingItHeldIsTakenBack) {
  if (!gpusock::cuda_available()) GTEST_SKIP() << kNoGpu;
  TrapWithCallsInFlight(DeviceKind::kCuda);
}

// Block 0's lane 0 traps at once; every block that runs the kernel counts itself.
struct TrapEarly {
  GPUSOCK_HD void operator()(uint32_t* started) const {
    if (gpusock::warp::lane_id() != 0) return;
    gpusock::AtomicRef<uint32_t, gpusock::Scope::kDevice>(*started).fetch_add(1, gpusock::Order::kRelaxed);
    if (gpusock::global_warp_id() == 0) gpusock::trap();
  }
};

void BlocksStartedAfterATrapNeverRun(DeviceKind kind, uint32_t blocks) {
  const gpusock::RuntimeOptions o = OptionsFor(kind);
  auto rtr = Runtime::create(o);
  ASSERT_TRUE(rtr.ok()) << rtr.status().to_string();
  Runtime& rt = **rtr;
  Host host;
  host.install(rt);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  auto started = DeviceBuffer<uint32_t>::create(rt, 1);
  ASSERT_TRUE(started.ok());
  ASSERT_TRUE(started->from_host(std::vector<uint32_t>{0}).ok());
  auto k = gpusock::launch(rt, {blocks}, {32}, TrapEarly{}, started->data());
  ASSERT_TRUE(k.ok()) << k.status().to_string();
  ASSERT_TRUE(k->wait_for(std::chrono::seconds(120)));
  gpusock::Status s = k->wait();
  EXPECT_EQ(s.code(), EIO) << s.to_string();
  EXPECT_NE(s.message().find("block (0,0,0) thread (0,0,0)"), std::string::npos) << s.to_string();
  const uint32_t n = started->to_host()[0];
  EXPECT_GE(n, 1u);
  EXPECT_LT(n, blocks) << "every block ran the kernel, though all but the first waves started after the trap";
  std::printf("[ info ] %s: %u of %u blocks ran the kernel\n", kind == DeviceKind::kCpu ? "cpu" : "cuda", n, blocks);
  ExpectEverySlotWorks(rt);
  EXPECT_TRUE(rt.health().ok());
}

TEST(KernelAbort, CpuBlocksStartedAfterATrapNeverRunTheKernel) { BlocksStartedAfterATrapNeverRun(DeviceKind::kCpu, 64); }

TEST(KernelAbort, CudaBlocksStartedAfterATrapNeverRunTheKernel) {
  if (!gpusock::cuda_available()) GTEST_SKIP() << kNoGpu;
  // Far more blocks than a GPU holds at once (an H100 holds 132 x 32 of these).
  BlocksStartedAfterATrapNeverRun(DeviceKind::kCuda, 200000);
}

// One warp blocked in a held call.
struct Bystander {
  GPUSOCK_HD void operator()(int64_t* res) const { res[gpusock::warp::lane_id()] = hc::call(kOpHold, 1); }
};

// Every lane holds an answered ticket; lane 5 gives up (on the cpu device it throws, on a
// GPU it traps), the others spin.
struct Thrower {
  GPUSOCK_HD void operator()(uint32_t* box) const {
    hc::Ticket t = hc::submit(kOpEcho, 1, 1);
    (void)t;
    if (gpusock::warp::lane_id() == 5) {
#if GPUSOCK_IS_GPU
      gpusock::trap();
#else
      throw std::runtime_error("lane 5 gives up");
#endif
    }
    await(box, 9);
  }
};

void AbortLeavesOtherLaunchesAlone(DeviceKind kind) {
  const gpusock::RuntimeOptions o = OptionsFor(kind);
  auto rtr = Runtime::create(o);
  ASSERT_TRUE(rtr.ok()) << rtr.status().to_string();
  std::unique_ptr<Runtime> rt = std::move(rtr.value());
  Host host;
  host.install(*rt);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  auto m = rt->mapped_alloc(4096);
  ASSERT_TRUE(m.ok());
  rt->mapped_free_at_exit(m->host);
  auto* box = static_cast<uint32_t*>(m->host);
  auto* dbox = static_cast<uint32_t*>(m->device);
  // A bystander launch: one warp blocked in a held call.
  auto out = DeviceBuffer<int64_t>::create(*rt, 32);
  ASSERT_TRUE(out.ok());
  auto bystander = gpusock::launch(*rt, {1}, {32}, Bystander{}, out->data());
  ASSERT_TRUE(bystander.ok());
  for (int i = 0; i < 120000 && host.count() < 1; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ(host.count(), 1u);
  // The thrower: lane 5 throws while the others of its warp spin, holding an answered
  // ticket each.
  auto thrower = gpusock::launch(*rt, {1}, {32}, Thrower{}, dbox);
  ASSERT_TRUE(thrower.ok());
  ASSERT_TRUE(thrower->wait_for(std::chrono::seconds(120)));
  gpusock::Status s = thrower->wait();
  EXPECT_EQ(s.code(), EIO);
  EXPECT_NE(s.message().find(kind == DeviceKind::kCpu ? "lane 5 gives up" : "block (0,0,0) thread (5,0,0)"),
            std::string::npos)
      << s.to_string();
  // The bystander's call is untouched: still held, still answerable.
  EXPECT_FALSE(bystander->wait_for(std::chrono::milliseconds(10)));
  EXPECT_EQ(rt->stats().slots_owned, 1u);
  EXPECT_EQ(host.answer_all(), 1);
  ASSERT_TRUE(bystander->wait_for(std::chrono::seconds(120)));
  EXPECT_TRUE(bystander->wait().ok());
  for (int64_t v : out->to_host()) EXPECT_EQ(v, 1);
  ExpectEverySlotWorks(*rt);
  (void)box;
}

TEST(KernelAbort, CpuLaneThatThrowsAbortsItsLaunchAndOtherLaunchesRunOn) {
  AbortLeavesOtherLaunchesAlone(DeviceKind::kCpu);
}

TEST(KernelAbort, CudaLaneThatTrapsAbortsItsLaunchAndOtherLaunchesRunOn) {
  if (!gpusock::cuda_available()) GTEST_SKIP() << kNoGpu;
  AbortLeavesOtherLaunchesAlone(DeviceKind::kCuda);
}

// ---- a fault on a GPU: last, since it loses CUDA for the rest of the process ------------

// Roles by global warp: 0 blocks every lane in a held call; 1 (lane 0) leaves answered
// tickets and a held payload call in flight; 2 (lane 0) faults (a raw `trap`
// instruction, not gpusock::trap()) once the host says so.
struct FaultOnGpu {
  GPUSOCK_HD void operator()(uint32_t* box, const uint8_t* payload) const {
    const uint64_t warp = gpusock::global_warp_id();
    const uint32_t lane = gpusock::warp::lane_id();
    if (warp == 0) {
      hc::call(kOpHold, 0);
    } else if (warp == 1 && lane == 0) {
      hc::submit(kOpEcho, 1, 1);
      hc::submit(kOpEcho, 2, 2);
      hc::submit_with_payload(kOpHold, payload, kPayload, uint64_t{7});
      put(box, 1, 1);
      await(box, 9);
    } else if (warp == 2 && lane == 0) {
      await(box, 0);
#if GPUSOCK_IS_GPU
      asm volatile("trap;");
#endif
    }
  }
};

TEST(KernelAbort, CudaFaultFailsTheRuntimeWhichRefusesWorkAndSaysWhy) {
  if (!gpusock::cuda_available()) {
    GTEST_SKIP() << "needs a GPU: a fault on a GPU loses the CUDA context, which the cpu device cannot show "
                    "(no usable GPU here: cudaGetDeviceCount found none)";
  }
  gpusock::RuntimeOptions o;
  o.device = DeviceKind::kCuda;
  {
    // The driver opens its own descriptors once; count from there.
    auto warm = Runtime::create(o);
    ASSERT_TRUE(warm.ok()) << warm.status().to_string();
  }
  const auto fds_before = non_driver(fd_targets());
  {
    auto rtr = Runtime::create(o);
    ASSERT_TRUE(rtr.ok()) << rtr.status().to_string();
    std::unique_ptr<Runtime> rt = std::move(rtr.value());
    Host host;
    host.install(*rt);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    auto m = rt->mapped_alloc(4096);
    ASSERT_TRUE(m.ok());
    rt->mapped_free_at_exit(m->host);
    auto* box = static_cast<uint32_t*>(m->host);
    void* payload = nullptr;
    {
      auto p = rt->device_alloc(kPayload);
      ASSERT_TRUE(p.ok());
      payload = p.value();
      rt->device_free_at_exit(payload);
    }
    auto k = gpusock::launch(*rt, {1}, {96}, FaultOnGpu{}, static_cast<uint32_t*>(m->device),
                             static_cast<const uint8_t*>(payload));
    ASSERT_TRUE(k.ok()) << k.status().to_string();
    ASSERT_TRUE(await_host(box, 1, std::chrono::seconds(60)));
    for (int i = 0; i < 60000 && host.count() < 2; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ASSERT_EQ(host.count(), 2u);
    EXPECT_TRUE(rt->health().ok());

    std::atomic_ref<uint32_t>(box[0]).store(1, std::memory_order_release);  // trap
    ASSERT_TRUE(k->wait_for(std::chrono::seconds(60))) << "the trapped kernel did not end";
    gpusock::Status s = k->wait();
    EXPECT_EQ(s.code(), EIO) << s.to_string();
    EXPECT_NE(s.message().find("aborted"), std::string::npos) << s.to_string();

    // The context is lost: the runtime says so, and refuses new work with that reason.
    gpusock::Status h = rt->health();
    EXPECT_EQ(h.code(), EIO) << h.to_string();
    EXPECT_NE(h.message().find("create a new Runtime"), std::string::npos) << h.to_string();
    auto again = gpusock::launch(*rt, {1}, {32}, UseEverySlot{}, static_cast<hc::Ticket*>(nullptr), 0u,
                                 static_cast<int64_t*>(nullptr));
    ASSERT_FALSE(again.ok());
    EXPECT_EQ(again.status().code(), EIO);
    EXPECT_EQ(rt->register_handler(kOpEcho + 100, "late", [](hc::Call& c) { c.set_all(0); }).code(), EIO);
    EXPECT_FALSE(rt->device_alloc(64).ok());
    // Calls in flight were answered when the runtime failed; late answers reach nobody.
    EXPECT_EQ(host.answer_all(), 0);
  }
  {
    // Destroying the failed runtime reset the device (cudaDeviceReset()). Where the driver
    // lets this process use the GPU again, a new runtime runs a kernel over its whole pool.
    // Where it does not (the H100 test machine: every CUDA call then answers
    // cudaErrorDevicesUnavailable, with no gpusock involved, scripts/cuda_trap_probe.cu),
    // creating one fails with that reason, neither crashing nor hanging.
    auto rtr = Runtime::create(o);
    if (!rtr.ok()) {
      EXPECT_TRUE(rtr.status().code() == EIO || rtr.status().code() == ENODEV) << rtr.status().to_string();
      EXPECT_NE(rtr.status().message().find("cuda"), std::string::npos) << rtr.status().to_string();
      std::printf("[ info ] after the fault this process cannot use the GPU again: %s\n",
                  rtr.status().to_string().c_str());
    } else {
      Host host;
      host.install(**rtr);
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
      EXPECT_TRUE((*rtr)->health().ok());
      ExpectEverySlotWorks(**rtr);
      std::printf("[ info ] after the fault a new runtime ran a kernel over its whole pool\n");
    }
  }
  // Nothing the runtime opened is left open. (Fewer may be: the driver's own eventfds and
  // pipes go with the context when it cannot be made again.)
  const auto fds_after = non_driver(fd_targets());
  EXPECT_TRUE(std::includes(fds_before.begin(), fds_before.end(), fds_after.begin(), fds_after.end()))
      << "before: " << describe(fds_before) << "\nafter: " << describe(fds_after);
}

}  // namespace
