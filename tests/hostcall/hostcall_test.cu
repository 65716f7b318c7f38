// The hostcall core on both devices. Every test runs once on the cpu device and once on
// a GPU; the GPU run skips, with its reason, where no GPU is present.
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(GPUSOCK_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/format.hpp"
#include "gpusock/hostcall/io.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/opcodes.hpp"
#include "gpusock/hostcall/runtime.hpp"

namespace {

using gpusock::DeviceBuffer;
using gpusock::DeviceKind;
using gpusock::Dim3;
using gpusock::Runtime;
namespace hc = gpusock::hostcall;

constexpr uint32_t kOpEcho = hc::kTestFirst + 1;      // answers arg0 * 3 + arg1
constexpr uint32_t kOpThrow = hc::kTestFirst + 2;     // throws
constexpr uint32_t kOpDeferred = hc::kTestFirst + 3;  // answered later, out of order
constexpr uint32_t kOpHold = hc::kTestFirst + 4;      // never answered until shutdown
constexpr uint32_t kOpMulti = hc::kTestFirst + 5;     // three result words per lane
constexpr uint32_t kOpSparse = hc::kTestFirst + 6;    // word 2 set only for even lanes
constexpr uint32_t kOpDigest = hc::kTestFirst + 7;    // payload length, arg0, payload digest

constexpr auto kKernelTimeout = std::chrono::seconds(600);


// ---- kernels ------------------------------------------------------------------------

struct NullCalls {
  GPUSOCK_HD void operator()(int64_t* out, int iters) const {
    int64_t bad = 0;
    for (int i = 0; i < iters; ++i) bad += gpusock::hostcall::call(hc::op::kNull) != 0;
    out[gpusock::global_thread_id()] = bad;
  }
};

// Per thread: a null call, then every byte of module 1's head and both module pointers
// against what the test set (head byte i = i * 7 + 3). 1 when all is right (the buffer
// starts zeroed, so a thread that never ran shows).
struct ContextCheck {
  GPUSOCK_HD void operator()(int64_t* out, const void* state) const {
    int64_t bad = gpusock::hostcall::call(hc::op::kNull) != 0 ? 1000 : 0;
    const auto* head = static_cast<const uint8_t*>(hc::module_head(1));
    for (uint32_t i = 0; i < hc::kModuleHeadBytes; ++i) bad += head[i] != static_cast<uint8_t>(i * 7 + 3);
    const auto* none = static_cast<const uint8_t*>(hc::module_head(2));
    for (uint32_t i = 0; i < hc::kModuleHeadBytes; ++i) bad += none[i] != 0;
    bad += hc::module_state(1) != state ? 100 : 0;
    bad += hc::module_state(2) != nullptr ? 100 : 0;
    out[gpusock::global_thread_id()] = 1 + bad;
  }
};

// Each lane sends its own arguments; records result - expected (0 when right).
struct EchoPerLane {
  GPUSOCK_HD void operator()(int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    int64_t r = hc::call(kOpEcho, tid, 1000 + gpusock::warp::lane_id());
    out[tid] = r - static_cast<int64_t>(tid * 3 + 1000 + gpusock::warp::lane_id());
  }
};

// Even lanes call kOpEcho, odd lanes kOpMulti; lanes >= 24 make no call at all.
struct Divergent {
  GPUSOCK_HD void operator()(int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    uint32_t lane = gpusock::warp::lane_id();
    int64_t err = 0;
    if (lane < 24) {
      if (lane % 2 == 0) {
        err = hc::call(kOpEcho, tid, 7) - static_cast<int64_t>(tid * 3 + 7);
      } else {
        uint64_t more[2];
        int64_t r = hc::wait(hc::submit(kOpMulti, tid), more, 2);
        err = (r != static_cast<int64_t>(tid)) + (more[0] != tid + 1) + (more[1] != tid + 2);
      }
    }
    out[tid] = err;
  }
};

// Many calls per lane through a handler that answers later, from other threads, in
// random order. Counts wrong replies.
struct ManyDeferred {
  GPUSOCK_HD void operator()(int64_t* bad, int iters) const {
    uint64_t tid = gpusock::global_thread_id();
    int64_t wrong = 0;
    for (int i = 0; i < iters; ++i) {
      uint64_t key = tid * 1000003ull + static_cast<uint64_t>(i);
      int64_t r = hc::call(kOpDeferred, key);
      wrong += r != static_cast<int64_t>((key * 2654435761ull) & 0x7fffffffffffull);
    }
    bad[tid] = wrong;
  }
};

// Several calls in flight per lane, waited for in reverse order.
struct AsyncInFlight {
  GPUSOCK_HD void operator()(int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    hc::Ticket t0 = hc::submit(kOpEcho, tid, 0);
    hc::Ticket t1 = hc::submit(kOpEcho, tid, 1);
    hc::Ticket t2 = hc::submit(kOpEcho, tid, 2);
    int64_t r2 = hc::wait(t2), r1 = hc::wait(t1), r0 = hc::wait(t0);
    out[tid] = (r0 != static_cast<int64_t>(tid * 3)) + (r1 != static_cast<int64_t>(tid * 3 + 1)) +
               (r2 != static_cast<int64_t>(tid * 3 + 2));
  }
};

struct CallOne {
  GPUSOCK_HD void operator()(int64_t* out, uint32_t opcode) const {
    out[gpusock::global_thread_id()] = hc::call(opcode, gpusock::global_thread_id());
  }
};

// Publishes a slot by hand with whatever header fields it is given, as a buggy kernel
// might, optionally without ringing the doorbell. Lane 0 only. out[0]: lane 0's answer;
// out[1]: what the host left in lane 3's result word (out must hold two words).
struct RawPublish {
  GPUSOCK_HD void operator()(int64_t* out, uint32_t opcode, uint32_t mask, uint32_t nargs, uint32_t flags,
                             uint64_t arg1, uint64_t arg2, int ring, uint32_t seq_delta = 0) const {
    if (gpusock::global_thread_id() != 0) return;
    const hc::DeviceContext* c = hc::context();
    uint32_t slot = 0;
    if (hc::internal::acquire_slot(c, 0, &slot) != 0) {
      out[0] = -12345;
      return;
    }
    uint32_t pos = hc::internal::take_ring_position(c);
    uint32_t seq = pos & hc::kSeqMask;
    hc::Slot* s = c->slots + slot;
    s->data[0][0] = 1;  // fd for kWrite
    s->data[1][0] = arg1;
    s->data[2][0] = arg2;
    s->hdr.opcode = opcode;
    s->hdr.lane_mask = mask;
    s->hdr.nargs = static_cast<uint16_t>(nargs);
    s->hdr.flags = static_cast<uint16_t>(flags);
    s->hdr.staging_first = 0;
    s->hdr.staging_count = 0;
    s->hdr.seq = seq + seq_delta;
    // Only lane 0 takes part; every other lane's column is left from another request.
    for (uint32_t l = 0; l < 32; ++l) s->tag[l] = hc::request_tag(l == 0 ? seq : seq + 1);
    gpusock::AtomicRef<uint64_t, gpusock::Scope::kSystem>(s->hdr.state)
        .store(hc::make_state(seq, hc::kRequest), gpusock::Order::kRelease);
    // Without a doorbell the position is still given back, as a filler.
    hc::internal::ring_doorbell(c, pos, ring ? slot : hc::kFillerSlot, seq);
    hc::Ticket t;
    t.slot = slot;
    t.seq = seq;
    t.mask = 1;
    out[0] = hc::wait(t);
    // What the host left in lane 3's column (read before the slot goes back: wait() above
    // released it, but nothing else runs in this test's kernel).
    out[1] = static_cast<int64_t>(gpusock::AtomicRef<uint64_t, gpusock::Scope::kSystem>(s->data[0][3]).load(gpusock::Order::kRelaxed));
  }
};

// Writes "w<warp> l<lane> ....\n" lines of varying length to fd 1; a lane can also
// be sent to a bad fd. Records each lane's return value and errno.
struct WriteLines {
  GPUSOCK_HD void operator()(int64_t* ret, int64_t* err, int bad_lane, int repeat) const {
    uint64_t tid = gpusock::global_thread_id();
    uint32_t lane = gpusock::warp::lane_id();
    gpusock::Line<256> line;
    line.add('t').add(tid).add(' ');
    // A lane-dependent run of payload so lines differ in length and content.
    for (uint32_t i = 0; i < 16 + lane * 5; ++i) line.add(static_cast<char>('a' + (tid + i) % 26));
    line.add('\n');
    int fd = static_cast<int>(lane) == bad_lane ? 7 : 1;
    int64_t total = 0;
    for (int r = 0; r < repeat; ++r) {
      int64_t w = gpusock::write(fd, line.data(), line.size());
      if (w < 0) {
        total = -1;
        break;
      }
      total += w;
    }
    ret[tid] = total;
    err[tid] = total < 0 ? gpusock::errno_value() : 0;
  }
};

struct BigWrite {
  GPUSOCK_HD void operator()(const char* src, uint64_t n, int64_t* ret) const {
    if (gpusock::global_thread_id() == 0) ret[0] = gpusock::write(1, src, n);
  }
};

// FNV-1a over n bytes: what the kernel and the digest handler both compute.
GPUSOCK_HD inline uint64_t digest(const uint8_t* p, uint64_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

GPUSOCK_HD inline uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

// Every lane sends a payload of 1 to 40 KiB each round, so a warp's payloads add up to
// several staging runs (256 KiB) and its group splits into several calls. Lanes sit rounds
// out and take one of two call sites at random, so split groups of different sizes and
// sites are in flight at once. Counts lanes whose answer is not their own payload's.
struct BigPayloads {
  GPUSOCK_HD void operator()(const uint8_t* src, uint64_t src_len, int64_t* bad, int rounds) const {
    const uint64_t tid = gpusock::global_thread_id();
    int64_t wrong = 0;
    for (int i = 0; i < rounds; ++i) {
      const uint64_t r = mix(tid * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i));
      if (r % 5 == 0) continue;
      const uint32_t len = 1024 + static_cast<uint32_t>((r >> 8) % (39 * 1024));
      const uint8_t* p = src + (r >> 24) % (src_len - len);
      const uint64_t key = tid * 100000 + static_cast<uint64_t>(i);
      uint64_t more[2];
      int64_t got;
      if ((r >> 4) & 1) {
        got = hc::wait(hc::submit_with_payload(kOpDigest, p, len, key), more, 2);
      } else {
        hc::Ticket t = hc::submit_with_payload(kOpDigest, p, len, key);
        got = hc::wait_keep_staging(t, more, 2);
        hc::release(t);
      }
      wrong += got != static_cast<int64_t>(len) || more[0] != key || more[1] != digest(p, len);
    }
    bad[tid] = wrong;
  }
};

// One case of GroupCopyMixes, the same on host and device: whether `lane` takes part, how
// many bytes it copies, from where to where, into its global area or a buffer on its
// stack, and with fresh loads or not. The cases cover one lane alone, a few, half and the
// whole warp; lengths around the 16-byte unit and the batch of units; aligned and
// unaligned pointers; lengths the same in every lane or different in each.
struct CopyCase {
  bool in = false;
  bool local = false;
  bool fresh = false;
  uint32_t len = 0, soff = 0, doff = 0;
};
inline constexpr uint32_t kCopyArea = 4096 + 64;  // a lane's area of dst: doff + len + guards fit
GPUSOCK_HD inline CopyCase copy_case(uint32_t k, uint32_t lane) {
  constexpr uint32_t kLens[] = {0, 1, 15, 16, 17, 64, 100, 127, 128, 129, 1000, 1024, 1031, 2048, 4080};
  constexpr uint32_t kNum = sizeof(kLens) / sizeof(kLens[0]);
  const uint64_t rk = mix(0x51ed27ull + k);                    // the case's choices
  const uint64_t r = mix(rk ^ (uint64_t{lane} * 0x9e3779b97f4a7c15ull));  // this lane's
  CopyCase c;
  switch (rk % 4) {
    case 0: c.in = true; break;
    case 1: c.in = lane == (rk >> 8) % 32; break;
    case 2: c.in = lane < 3; break;
    default: c.in = ((r >> 3) & 1) != 0; break;
  }
  c.len = ((rk >> 16) & 1) != 0 ? kLens[(r >> 8) % kNum] : kLens[(rk >> 20) % kNum];
  const bool aligned = ((rk >> 24) & 3) != 0;
  c.soff = aligned ? 16 * static_cast<uint32_t>((r >> 32) % 64) : static_cast<uint32_t>((r >> 32) % 1024);
  c.doff = aligned ? 16 : 1 + static_cast<uint32_t>((r >> 44) % 15);
  c.local = ((rk >> 28) % 4) == 0 && c.len <= 256;
  c.fresh = ((rk >> 32) & 1) != 0;
  return c;
}

// Runs `cases` cases of group_copy over one warp: the lanes of a case copy together, each
// its own bytes; then every lane checks its bytes and one guard byte either side.
// bad[lane] = bytes wrong; moved[lane] = bytes it copied.
struct GroupCopyMixes {
  GPUSOCK_HD void operator()(const uint8_t* src, uint8_t* dst, uint32_t cases, int64_t* bad, int64_t* moved) const {
    const uint32_t lane = gpusock::warp::lane_id();
    const uint32_t all = gpusock::warp::existing_mask();
    uint8_t* area = dst + uint64_t{lane} * kCopyArea;
    int64_t wrong = 0, total = 0;
    for (uint32_t k = 0; k < cases; ++k) {
      const CopyCase c = copy_case(k, lane);
      alignas(16) uint8_t stack[256 + 32];
      uint8_t* to = (c.local ? stack : area) + c.doff;
      const uint8_t guard = static_cast<uint8_t>(0xa5 ^ k);
      for (uint32_t i = 0; i < c.len + 2; ++i) to[static_cast<int64_t>(i) - 1] = guard;
      gpusock::warp::sync(all);  // the guards are written before any lane copies into this area
      const uint32_t mask = gpusock::warp::ballot(all, c.in);
      if (c.in) hc::internal::group_copy(mask, to, src + c.soff, c.len, c.fresh);
      gpusock::warp::sync(all);
      if (!c.in) continue;
      wrong += to[-1] != guard;
      wrong += to[c.len] != guard;
      for (uint32_t i = 0; i < c.len; ++i) wrong += to[i] != src[c.soff + i];
      total += c.len;
    }
    bad[lane] = wrong;
    moved[lane] = total;
  }
};

// Reads the monotonic clock many times; out[tid*3] = first, +1 = last, +2 = # of times
// it went backwards.
struct ClockReads {
  GPUSOCK_HD void operator()(int64_t* out, int iters) const {
    uint64_t tid = gpusock::global_thread_id();
    timespec ts;
    int64_t prev = 0, first = 0, back = 0;
    for (int i = 0; i < iters; ++i) {
      if (gpusock::clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        back += 1000000;
        break;
      }
      int64_t t = static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
      if (i == 0) first = t;
      if (t < prev) ++back;
      prev = t;
    }
    timespec rt;
    int bad_clock = gpusock::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &rt);
    int bad_errno = gpusock::errno_value();
    gpusock::clock_gettime(CLOCK_REALTIME, &rt);
    out[tid * 4] = first;
    out[tid * 4 + 1] = prev;
    out[tid * 4 + 2] = back + (bad_clock == -1 && bad_errno == EINVAL ? 0 : 1000);
    out[tid * 4 + 3] = static_cast<int64_t>(rt.tv_sec);
  }
};

// ---- fixture ------------------------------------------------------------------------

int64_t host_ns(clockid_t c) {
  timespec ts;
  ::clock_gettime(c, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

uint64_t lanes_for(const gpusock::RuntimeStats& s, uint32_t opcode, uint64_t* calls = nullptr) {
  for (const auto& o : s.by_opcode) {
    if (o.opcode == opcode) {
      if (calls) *calls = o.calls;
      return o.lanes;
    }
  }
  return 0;
}

class HostcallTest : public ::testing::TestWithParam<DeviceKind> {
 protected:
  void SetUp() override {
    if (GetParam() == DeviceKind::kCuda && !gpusock::cuda_available()) {
      GTEST_SKIP() << "no usable GPU here (cudaGetDeviceCount found none); the cpu-device run covers this test";
    }
    opts_.device = GetParam();
    opts_.cpu_resident_warps = 32;
  }
  void Start() {
    auto rt = Runtime::create(opts_);
    ASSERT_TRUE(rt.ok()) << rt.status().to_string();
    rt_ = std::move(rt.value());
    ASSERT_TRUE(rt_->register_handler(kOpEcho, "echo", [](hc::Call& c) {
                      c.for_each_lane([&](uint32_t l) { c.set_result(l, static_cast<int64_t>(c.arg(l, 0) * 3 + c.arg(l, 1))); });
                    }).ok());
    ASSERT_TRUE(rt_->register_handler(kOpMulti, "multi", [](hc::Call& c) {
                      c.for_each_lane([&](uint32_t l) {
                        c.set_result(l, static_cast<int64_t>(c.arg(l, 0)));
                        c.set_result(l, 1, c.arg(l, 0) + 1);
                        c.set_result(l, 2, c.arg(l, 0) + 2);
                      });
                    }).ok());
    ASSERT_TRUE(rt_->register_handler(kOpDigest, "digest", [](hc::Call& c) {
                      c.for_each_lane([&](uint32_t l) {
                        std::span<const uint8_t> p;
                        if (int e = c.payload(l, 1, &p); e != 0) return c.set_result(l, e);
                        c.set_result(l, static_cast<int64_t>(p.size()));
                        c.set_result(l, 1, c.arg(l, 0));
                        c.set_result(l, 2, digest(p.data(), p.size()));
                      });
                    }).ok());
  }
  template <typename K, typename... A>
  void Run(Dim3 grid, Dim3 block, K k, A... a) {
    auto l = gpusock::launch(*rt_, grid, block, k, a...);
    ASSERT_TRUE(l.ok()) << l.status().to_string();
    if (!l->wait_for(kKernelTimeout)) {
      // Fail, but leave nothing running behind: shutdown fails the kernel's calls.
      rt_->shutdown();
      l->wait_for(std::chrono::seconds(60));
      FAIL() << "kernel did not finish within " << kKernelTimeout.count() << " s";
    }
    gpusock::Status s = l->wait();
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
  template <typename T>
  DeviceBuffer<T> Buffer(size_t n) {
    auto b = DeviceBuffer<T>::create(*rt_, n);
    EXPECT_TRUE(b.ok()) << b.status().to_string();
    return std::move(b.value());
  }

  gpusock::RuntimeOptions opts_;
  std::unique_ptr<Runtime> rt_;
};

std::string DeviceName(const ::testing::TestParamInfo<DeviceKind>& info) {
  return gpusock::to_string(info.param);
}

INSTANTIATE_TEST_SUITE_P(BothDevices, HostcallTest, ::testing::Values(DeviceKind::kCpu, DeviceKind::kCuda),
                         DeviceName);

// ---- tests --------------------------------------------------------------------------

TEST_P(HostcallTest, NullCallRoundTripAnswersZero) {
  Start();
  auto out = Buffer<int64_t>(64);
  Run({1}, {64}, NullCalls{}, out.data(), 10);
  for (int64_t v : out.to_host()) EXPECT_EQ(v, 0);
  EXPECT_EQ(lanes_for(rt_->stats(), hc::op::kNull), 640u);
}

// A GPU block copies the context into its shared memory when it starts; blocks of fewer
// threads than a warp, of more, and of three dimensions each see all of it, module heads
// included.
TEST_P(HostcallTest, BlocksOfEveryShapeSeeTheWholeContextAndModuleHeads) {
  Start();
  auto state = Buffer<uint8_t>(16);
  uint8_t head[hc::kModuleHeadBytes];
  for (uint32_t i = 0; i < sizeof head; ++i) head[i] = static_cast<uint8_t>(i * 7 + 3);
  EXPECT_EQ(rt_->set_module_state(1, state.data(), head, sizeof head + 1).code(), EINVAL);  // too long
  ASSERT_TRUE(rt_->set_module_state(1, state.data(), head, sizeof head).ok());
  EXPECT_EQ(rt_->set_module_state(1, state.data(), head, sizeof head).code(), EEXIST);
  for (Dim3 block : {Dim3{1}, Dim3{5}, Dim3{31}, Dim3{33}, Dim3{3, 2, 2}, Dim3{64}}) {
    const uint32_t threads = block.x * block.y * block.z;
    auto out = Buffer<int64_t>(2 * threads);
    Run({2}, block, ContextCheck{}, out.data(), static_cast<const void*>(state.data()));
    const auto got = out.to_host();
    for (uint32_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i], 1) << "block " << block.x << "x" << block.y << "x" << block.z << ", thread " << i;
    }
  }
}

TEST_P(HostcallTest, AllLanesWithDifferentArgumentsGetTheirOwnResultsInOneSlot) {
  Start();
  auto out = Buffer<int64_t>(4 * 128);
  Run({4}, {128}, EchoPerLane{}, out.data());
  for (int64_t v : out.to_host()) ASSERT_EQ(v, 0);
  uint64_t calls = 0;
  EXPECT_EQ(lanes_for(rt_->stats(), kOpEcho, &calls), 512u);
  // 16 warps that each call once with all 32 lanes converged: one slot per warp.
  EXPECT_EQ(calls, 16u);
}

TEST_P(HostcallTest, DivergentLaneGroupsEachGetTheirOwnCall) {
  Start();
  auto out = Buffer<int64_t>(2 * 64);
  Run({2}, {64}, Divergent{}, out.data());
  for (int64_t v : out.to_host()) ASSERT_EQ(v, 0);
  auto st = rt_->stats();
  EXPECT_EQ(lanes_for(st, kOpEcho), 4u * 12);
  EXPECT_EQ(lanes_for(st, kOpMulti), 4u * 12);
}

struct SparseResults {
  GPUSOCK_HD void operator()(int64_t* out) const {
    uint64_t tid = gpusock::global_thread_id();
    uint64_t more[3] = {99, 99, 99};
    int64_t r = hc::wait(hc::submit(kOpSparse, tid), more, 3);
    bool even = tid % 2 == 0;
    out[tid] = (r != 1) + (more[0] != 0) + (more[1] != (even ? tid : 0)) + (more[2] != 0);
  }
};

TEST_P(HostcallTest, ResultWordsAHandlerLeavesUnsetReadAsZero) {
  Start();
  ASSERT_TRUE(rt_->register_handler(kOpSparse, "sparse", [](hc::Call& c) {
                    c.set_all(1);
                    c.for_each_lane([&](uint32_t l) {
                      if (c.arg(l, 0) % 2 == 0) c.set_result(l, 2, c.arg(l, 0));
                    });
                  }).ok());
  auto out = Buffer<int64_t>(64);
  Run({1}, {64}, SparseResults{}, out.data());
  for (int64_t v : out.to_host()) EXPECT_EQ(v, 0);
}

TEST_P(HostcallTest, SeveralCallsInFlightPerWarpCompleteInAnyOrder) {
  Start();
  auto out = Buffer<int64_t>(256);
  Run({2}, {128}, AsyncInFlight{}, out.data());
  for (int64_t v : out.to_host()) ASSERT_EQ(v, 0);
  EXPECT_EQ(lanes_for(rt_->stats(), kOpEcho), 3u * 256);
}

// Thousands of warps, a million lane calls, each answered from a pool of completer
// threads after a random delay and in shuffled order; every reply is checked.
TEST_P(HostcallTest, MillionCallsFromThousandsOfWarpsWithRandomDelaysAllAnsweredCorrectly) {
  opts_.service_threads = 2;
  Start();
  struct Pending {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<hc::DeferredCall> q;
    bool stop = false;
  } p;
  ASSERT_TRUE(rt_->register_handler(kOpDeferred, "deferred", [&p](hc::Call& c) {
                    c.for_each_lane([&](uint32_t l) {
                      uint64_t key = c.arg(l, 0);
                      c.set_result(l, static_cast<int64_t>((key * 2654435761ull) & 0x7fffffffffffull));
                    });
                    hc::DeferredCall d = c.defer();
                    std::lock_guard<std::mutex> lock(p.mu);
                    p.q.push_back(std::move(d));
                    p.cv.notify_one();
                  }).ok());
  std::atomic<uint64_t> completed{0};
  // Whatever happens below, the runtime stops calling the handler before `p` goes away.
  struct StopFirst {
    Runtime* rt;
    ~StopFirst() { rt->shutdown(); }
  } stop_first{rt_.get()};
  std::vector<std::thread> completers;
  for (int i = 0; i < 3; ++i) {
    completers.emplace_back([&p, &completed, i] {
      std::mt19937 rng(1234 + i);
      std::vector<hc::DeferredCall> batch;
      for (;;) {
        {
          std::unique_lock<std::mutex> lock(p.mu);
          p.cv.wait(lock, [&] { return p.stop || !p.q.empty(); });
          if (p.stop && p.q.empty()) return;
          // Take a few at once and answer them in shuffled order.
          while (!p.q.empty() && batch.size() < 8) {
            batch.push_back(std::move(p.q.front()));
            p.q.pop_front();
          }
        }
        std::shuffle(batch.begin(), batch.end(), rng);
        for (auto& d : batch) {
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 20));
          if (d.complete()) completed.fetch_add(1);
        }
        batch.clear();
      }
    });
  }
  const bool gpu = GetParam() == DeviceKind::kCuda;
  // GPU: 2048 warps x 32 lanes x 16 calls; cpu device: 1024 warps x 32 lanes x 32 calls.
  const Dim3 grid{gpu ? 512u : 256u}, block{128};
  const int iters = gpu ? 16 : 32;
  const uint64_t threads = uint64_t{grid.x} * block.x;
  auto bad = Buffer<int64_t>(threads);
  Run(grid, block, ManyDeferred{}, bad.data(), iters);
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.stop = true;
  }
  p.cv.notify_all();
  for (auto& t : completers) t.join();
  uint64_t wrong = 0;
  for (int64_t v : bad.to_host()) wrong += static_cast<uint64_t>(v);
  EXPECT_EQ(wrong, 0u);
  uint64_t calls = 0;
  uint64_t lanes = lanes_for(rt_->stats(), kOpDeferred, &calls);
  EXPECT_EQ(lanes, threads * iters);
  EXPECT_GE(lanes, 1000000u);
  EXPECT_EQ(completed.load(), calls);  // every deferred reply reached its slot
}

TEST_P(HostcallTest, ThrowingHandlerAnswersEioAndHostKeepsServing) {
  Start();
  ASSERT_TRUE(rt_->register_handler(kOpThrow, "throw", [](hc::Call&) { throw std::runtime_error("boom"); }).ok());
  auto out = Buffer<int64_t>(64);
  Run({1}, {64}, CallOne{}, out.data(), kOpThrow);
  for (int64_t v : out.to_host()) EXPECT_EQ(v, -EIO);
  EXPECT_GE(rt_->stats().handler_exceptions, 1u);
  Run({1}, {64}, CallOne{}, out.data(), kOpEcho);
  auto h = out.to_host();
  for (size_t i = 0; i < h.size(); ++i) EXPECT_EQ(h[i], static_cast<int64_t>(i * 3));
}

TEST_P(HostcallTest, UnregisteredOpcodeAnswersEnosys) {
  Start();
  auto out = Buffer<int64_t>(32);
  Run({1}, {32}, CallOne{}, out.data(), hc::kUserFirst + 77);
  for (int64_t v : out.to_host()) EXPECT_EQ(v, -ENOSYS);
}

struct GarbageCase {
  uint32_t opcode, mask, nargs, flags;
  uint64_t arg1, arg2;
  int64_t want;
};

TEST_P(HostcallTest, GarbageWrittenIntoASlotFailsOnlyThatCall) {
  Start();
  auto out = Buffer<int64_t>(2);
  const uint64_t staging = rt_->staging_size();
  const GarbageCase cases[] = {
      {kOpEcho, 1, 200, 0, 0, 0, -EINVAL},                       // nargs beyond kMaxArgs
      {kOpEcho, 1, 2, 0x40, 0, 0, -EINVAL},                      // reserved flags set
      {0xdeadbeef, 1, 0, 0, 0, 0, -ENOSYS},                      // opcode out of range
      {kOpEcho, 0, 2, 0, 0, 0, -EINVAL},                         // no lanes at all
      {hc::op::kWrite, 1, 3, 0, 0, 64, -EFAULT},                 // in the arena, not this call's pages
      {hc::op::kWrite, 1, 3, 0, staging - 4, 64, -EFAULT},       // payload past the arena
      {hc::op::kWrite, 1, 3, 0, ~0ull - 8, 64, -EFAULT},         // offset + length overflows
      {hc::op::kWrite, 1, 2, 0, 0, 0, -EINVAL},                  // descriptor missing
  };
  for (const auto& g : cases) {
    Run({1}, {32}, RawPublish{}, out.data(), g.opcode, g.mask, g.nargs, g.flags, g.arg1, g.arg2, 1, 0u);
    EXPECT_EQ(out.to_host()[0], g.want) << "opcode " << g.opcode << " nargs " << g.nargs;
  }
  EXPECT_GE(rt_->stats().rejected, 3u);
  // The host still serves well-formed calls.
  auto echo = Buffer<int64_t>(32);
  Run({1}, {32}, EchoPerLane{}, echo.data());
  for (int64_t v : echo.to_host()) EXPECT_EQ(v, 0);
}

// A request's header and each lane's column carry the request's seq. Lanes named in the
// mask that did not write the request are answered -EPROTO in their own column and never
// run; a header from another request fails the whole call.
TEST_P(HostcallTest, LanesThatDidNotWriteARequestAreRefusedNotRun) {
  Start();
  auto out = Buffer<int64_t>(2);
  // Lanes 0 and 3 named, only lane 0 wrote the request.
  Run({1}, {32}, RawPublish{}, out.data(), kOpEcho, 0b1001u, 2u, 0u, uint64_t{5}, uint64_t{0}, 1, 0u);
  auto o = out.to_host();
  EXPECT_EQ(o[0], 3 * 1 + 5) << "the lane that wrote the request is served";
  EXPECT_EQ(o[1], -EPROTO) << "the lane that did not is answered EPROTO in its column";
  auto st = rt_->stats();
  EXPECT_EQ(st.foreign_lanes, 1u);
  EXPECT_EQ(lanes_for(st, kOpEcho), 1u) << "the handler ran for lane 0 only";
  // A header whose seq is not the state's.
  Run({1}, {32}, RawPublish{}, out.data(), kOpEcho, 1u, 2u, 0u, uint64_t{5}, uint64_t{0}, 1, 7u);
  EXPECT_EQ(out.to_host()[0], -EPROTO);
  st = rt_->stats();
  EXPECT_EQ(st.stale_headers, 1u);
  EXPECT_EQ(lanes_for(st, kOpEcho), 1u) << "the handler did not run";
  // Well-formed calls are served as before.
  auto echo = Buffer<int64_t>(32);
  Run({1}, {32}, EchoPerLane{}, echo.data());
  for (int64_t v : echo.to_host()) EXPECT_EQ(v, 0);
  EXPECT_EQ(rt_->stats().foreign_lanes, 1u);
}

TEST_P(HostcallTest, CallWithoutDoorbellIsFoundByTheSweep) {
  opts_.sweep_interval = std::chrono::milliseconds(2);
  Start();
  auto out = Buffer<int64_t>(2);
  Run({1}, {32}, RawPublish{}, out.data(), kOpEcho, 1u, 2u, 0u, uint64_t{5}, uint64_t{0}, 0, 0u);
  EXPECT_EQ(out.to_host()[0], 3 * 1 + 5);  // data[0][0] = 1, data[1][0] = 5
  EXPECT_GE(rt_->stats().swept, 1u);
}

TEST_P(HostcallTest, ShutdownFailsCallsKernelsAreWaitingOn) {
  Start();
  std::mutex mu;
  std::vector<hc::DeferredCall> held;
  std::atomic<int> arrived{0};
  ASSERT_TRUE(rt_->register_handler(kOpHold, "hold", [&](hc::Call& c) {
                    std::lock_guard<std::mutex> lock(mu);
                    held.push_back(c.defer());
                    arrived.fetch_add(1);
                  }).ok());
  auto out = Buffer<int64_t>(128);
  auto l = gpusock::launch(*rt_, {2}, {64}, CallOne{}, out.data(), kOpHold);
  ASSERT_TRUE(l.ok());
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (arrived.load() < 4 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(arrived.load(), 4);  // 4 warps, each one call
  EXPECT_FALSE(l->wait_for(std::chrono::milliseconds(50)));  // really blocked
  rt_->shutdown();
  ASSERT_TRUE(l->wait_for(std::chrono::seconds(30))) << "kernel still waiting after shutdown";
  for (int64_t v : out.to_host()) EXPECT_EQ(v, -ESHUTDOWN);
  // The late answers lose: the calls were already failed.
  std::lock_guard<std::mutex> lock(mu);
  for (auto& d : held) EXPECT_FALSE(d.complete());
  EXPECT_GE(rt_->stats().shutdown_failed, 4u);
}

TEST_P(HostcallTest, MonotonicClockNeverGoesBackAndIssuesNoHostcalls) {
  Start();
  auto out = Buffer<int64_t>(64 * 4);
  int64_t before = host_ns(CLOCK_MONOTONIC);
  Run({1}, {64}, ClockReads{}, out.data(), 2000);
  int64_t after = host_ns(CLOCK_MONOTONIC);
  int64_t real_after = host_ns(CLOCK_REALTIME);
  auto h = out.to_host();
  for (int t = 0; t < 64; ++t) {
    EXPECT_EQ(h[t * 4 + 2], 0) << "thread " << t;
    EXPECT_LE(h[t * 4], h[t * 4 + 1]);
    // Calibrated against the host clock: within 50 ms of the launch window.
    EXPECT_GT(h[t * 4], before - 50'000'000);
    EXPECT_LT(h[t * 4 + 1], after + 50'000'000);
    EXPECT_NEAR(static_cast<double>(h[t * 4 + 3]), static_cast<double>(real_after / 1000000000), 2.0);
  }
  EXPECT_EQ(rt_->stats().calls, 0u);
}

TEST_P(HostcallTest, WriteKeepsEachCallContiguousAndErrnoPerLane) {
  char path[] = "/tmp/gpusock-write-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  opts_.stdout_fd = fd;
  Start();
  const int repeat = 20;
  auto ret = Buffer<int64_t>(256);
  auto err = Buffer<int64_t>(256);
  Run({2}, {128}, WriteLines{}, ret.data(), err.data(), 5, repeat);
  auto r = ret.to_host();
  auto e = err.to_host();
  std::ifstream in(path);
  std::map<std::string, int> seen;
  std::string line;
  while (std::getline(in, line)) seen[line]++;
  close(fd);
  unlink(path);
  for (uint32_t tid = 0; tid < 256; ++tid) {
    uint32_t lane = tid % 32;
    std::string want = "t" + std::to_string(tid) + " ";
    for (uint32_t i = 0; i < 16 + lane * 5; ++i) want += static_cast<char>('a' + (tid + i) % 26);
    if (lane == 5) {
      EXPECT_EQ(r[tid], -1);
      EXPECT_EQ(e[tid], EBADF);  // only this lane's errno
      EXPECT_EQ(seen.count(want), 0u);
    } else {
      EXPECT_EQ(r[tid], static_cast<int64_t>((want.size() + 1) * repeat)) << "tid " << tid;
      EXPECT_EQ(e[tid], 0);
      EXPECT_EQ(seen[want], repeat) << "tid " << tid << ": line missing or torn";
    }
  }
  EXPECT_EQ(seen.size(), 256u - 8u);  // every line intact: nothing else in the file
}

TEST_P(HostcallTest, LongWriteArrivesWhole) {
  char path[] = "/tmp/gpusock-bigwrite-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  opts_.stdout_fd = fd;
  Start();
  std::string text;
  for (int i = 0; text.size() < 100000; ++i) text += "line " + std::to_string(i) + "\n";
  auto src = Buffer<char>(text.size());
  ASSERT_TRUE(src.from_host(std::vector<char>(text.begin(), text.end())).ok());
  auto ret = Buffer<int64_t>(1);
  Run({1}, {32}, BigWrite{}, static_cast<const char*>(src.data()), static_cast<uint64_t>(text.size()), ret.data());
  EXPECT_EQ(ret.to_host()[0], static_cast<int64_t>(text.size()));
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), text);
  close(fd);
  unlink(path);
}

TEST_P(HostcallTest, PayloadsLargerThanOneStagingRunSplitIntoCallsAndArriveWhole) {
  Start();
  constexpr uint64_t kSrc = 1 << 20;
  std::vector<uint8_t> bytes(kSrc);
  std::mt19937_64 rng(20261206);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  auto src = Buffer<uint8_t>(kSrc);
  ASSERT_TRUE(src.from_host(bytes).ok());
  const uint32_t threads = 4 * 64;
  const int rounds = 40;
  auto bad = Buffer<int64_t>(threads);
  Run({4}, {64}, BigPayloads{}, static_cast<const uint8_t*>(src.data()), kSrc, bad.data(), rounds);
  const auto b = bad.to_host();
  for (uint32_t t = 0; t < threads; ++t) EXPECT_EQ(b[t], 0) << "thread " << t;
  uint64_t calls = 0;
  const uint64_t lanes = lanes_for(rt_->stats(), kOpDigest, &calls);
  // About 4/5 of threads * rounds lanes took part; every warp's payloads needed several
  // calls, so there are more calls than warp-rounds.
  EXPECT_GT(lanes, threads * rounds / 2);
  EXPECT_GT(calls, uint64_t{threads / 32} * rounds);
}

// group_copy (client.hpp) chooses per call between the lanes copying together and each
// its own; every mix of lanes, lengths, alignments, stack buffers and fresh loads must
// move exactly each lane's bytes and touch nothing around them.
TEST_P(HostcallTest, GroupCopyMovesEveryLanesBytesWhateverTheMix) {
  Start();
  constexpr uint32_t kCases = 3000;
  std::vector<uint8_t> bytes(8192);
  std::mt19937_64 rng(20261207);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  auto src = Buffer<uint8_t>(bytes.size());
  ASSERT_TRUE(src.from_host(bytes).ok());
  auto dst = Buffer<uint8_t>(32 * kCopyArea);
  auto bad = Buffer<int64_t>(32);
  auto moved = Buffer<int64_t>(32);
  Run({1}, {32}, GroupCopyMixes{}, static_cast<const uint8_t*>(src.data()), dst.data(), kCases, bad.data(), moved.data());
  const auto b = bad.to_host();
  const auto m = moved.to_host();
  int64_t want_total = 0, lone = 0, local = 0, unaligned = 0;
  for (uint32_t lane = 0; lane < 32; ++lane) {
    int64_t want = 0;
    for (uint32_t k = 0; k < kCases; ++k) {
      const CopyCase c = copy_case(k, lane);
      if (!c.in) continue;
      want += c.len;
      local += c.local && c.len > 0;
      unaligned += c.doff != 16 && c.len > 0;
    }
    EXPECT_EQ(b[lane], 0) << "lane " << lane;
    EXPECT_EQ(m[lane], want) << "lane " << lane;
    want_total += want;
  }
  for (uint32_t k = 0; k < kCases; ++k) {
    uint32_t n = 0;
    for (uint32_t lane = 0; lane < 32; ++lane) n += copy_case(k, lane).in;
    lone += n == 1;
  }
  // The mix is wide: each kind of case happened many times.
  EXPECT_GT(want_total, int64_t{10} << 20);
  EXPECT_GT(lone, 300);
  EXPECT_GT(local, 1000);
  EXPECT_GT(unaligned, 1000);
}

// The GPU's way of group_copy, run on the host: copy_share() for every lane of a split
// (`first` 0..step-1 of `step`) must together move exactly the n bytes, each byte once,
// and touch nothing around them; copy_rounds(), which group_copy uses to choose between
// copying together and alone, must say how many batches the split's longest lane takes.
// Sizes cover the unit path's whole batches and tails, the byte path (either pointer off
// 16-byte alignment), and lanes with nothing to do (step larger than the work).
TEST(GroupCopyPieces, EverySplitMovesEachByteOnceAndCopyRoundsCountsItsLongestLane) {
  namespace in = gpusock::hostcall::internal;
  constexpr uint32_t kGuard = 64, kMax = 5000;
  std::mt19937_64 rng(20261208);
  // src: random bytes; ones: all 1, copied by each lane onto a cleared `mark` to see
  // which bytes that lane wrote; hits: per byte, how many lanes wrote it.
  alignas(16) static uint8_t src[kMax + 2 * kGuard], ones[kMax + 2 * kGuard];
  alignas(16) static uint8_t dst[kMax + 2 * kGuard], mark[kMax + 2 * kGuard];
  static uint8_t hits[kMax + 2 * kGuard];
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  std::memset(ones, 1, sizeof ones);
  const uint32_t steps[] = {1, 2, 3, 5, 8, 17, 31, 32};
  uint64_t unit_cases = 0, byte_cases = 0;
  for (uint32_t k = 0; k < 4000; ++k) {
    const uint32_t n = k < 300 ? k : static_cast<uint32_t>(rng() % (k % 7 == 0 ? kMax : 700));
    const uint32_t soff = (k % 5 == 0) ? static_cast<uint32_t>(rng() % 16) : 0;
    const uint32_t doff = (k % 3 == 0) ? static_cast<uint32_t>(rng() % 16) : 0;
    const uint32_t step = steps[k % 8];
    const uint8_t* s = src + kGuard + soff;
    uint8_t* d = dst + kGuard + doff;
    std::memset(dst, 0xa5, sizeof dst);
    std::memset(hits, 0, sizeof hits);
    uint32_t longest = 0;
    for (uint32_t first = 0; first < step; ++first) {
      uint32_t batches = 0;
      in::copy_share<false>(d, s, n, first, step, &batches);
      longest = std::max(longest, batches);
      std::memset(mark, 0, sizeof mark);
      in::copy_share<false>(mark + kGuard + doff, ones + kGuard + soff, n, first, step);
      for (uint32_t i = 0; i < sizeof hits; ++i) hits[i] = static_cast<uint8_t>(hits[i] + mark[i]);
    }
    for (uint32_t i = 0; i < n; ++i) {
      ASSERT_EQ(d[i], s[i]) << "case " << k << " n " << n << " step " << step << " byte " << i;
      ASSERT_EQ(hits[kGuard + doff + i], 1) << "case " << k << " byte " << i << ": lanes that wrote it";
    }
    for (uint32_t i = 0; i < kGuard + doff; ++i) ASSERT_EQ(dst[i], 0xa5) << "case " << k << " before, " << i;
    for (uint32_t i = kGuard + doff + n; i < sizeof dst; ++i) ASSERT_EQ(dst[i], 0xa5) << "case " << k << " after, " << i;
    ASSERT_EQ(in::copy_rounds(d, s, n, step), longest) << "case " << k << " n " << n << " step " << step
                                                       << " aligned " << in::aligned16(d, s);
    if (n >= 16 && in::aligned16(d, s)) ++unit_cases;
    if (n > 0 && !in::aligned16(d, s)) ++byte_cases;
  }
  EXPECT_GT(unit_cases, 1000u);
  EXPECT_GT(byte_cases, 1000u);
}

TEST_P(HostcallTest, RegisterHandlerRejectsBadOpcodes) {
  Start();
  auto noop = [](hc::Call&) {};
  EXPECT_EQ(rt_->register_handler(kOpEcho, "again", noop).code(), EEXIST);
  EXPECT_EQ(rt_->register_handler(hc::op::kNull, "core", noop).code(), EINVAL);
  EXPECT_EQ(rt_->register_handler(hc::kOpcodeLimit, "big", noop).code(), EINVAL);
  EXPECT_EQ(rt_->register_handler(hc::kUserFirst, "empty", hc::Handler{}).code(), EINVAL);
  EXPECT_TRUE(rt_->register_handler(hc::kUserFirst, "user", noop).ok());
  rt_->shutdown();
  EXPECT_EQ(rt_->register_handler(hc::kUserFirst + 1, "late", noop).code(), ESHUTDOWN);
}

// deliver() copies only into runtime allocations, whole; anything else is EFAULT and the
// memory around it is untouched.
TEST_P(HostcallTest, DeliverWritesOnlyInsideALiveDeviceAllocation) {
  Start();
  // a's size is no multiple of the GPU's allocation grain, so a + kA is in no allocation
  // (cudaMalloc may place b right after a's rounded-up end).
  constexpr size_t kN = 64 * 1024, kA = kN - 256;
  auto a = Buffer<uint8_t>(kA);
  auto b = Buffer<uint8_t>(kN);
  std::vector<uint8_t> src(kN);
  for (size_t i = 0; i < kN; ++i) src[i] = static_cast<uint8_t>(i * 7 + 1);
  const gpusock::RuntimeStats before = rt_->stats();
  // Inside: the whole allocation, and a piece at an offset.
  ASSERT_TRUE(rt_->deliver(a.data(), src.data(), kA).ok());
  ASSERT_TRUE(rt_->deliver(b.data() + 1000, src.data(), 5000).ok());
  EXPECT_TRUE(rt_->is_device_memory(a.data() + 10, kA - 10));
  EXPECT_FALSE(rt_->is_device_memory(a.data() + 10, kA - 9));
  // Outside or across an end: refused.
  EXPECT_EQ(rt_->deliver(a.data() + 1, src.data(), kA).code(), EFAULT);            // runs past the end
  EXPECT_EQ(rt_->deliver(a.data() + kA, src.data(), 1).code(), EFAULT);            // just past it
  EXPECT_EQ(rt_->deliver(a.data() - 1, src.data(), 2).code(), EFAULT);             // starts before it
  EXPECT_EQ(rt_->deliver(src.data(), src.data() + 1, 16).code(), EFAULT);          // host memory
  EXPECT_EQ(rt_->deliver(nullptr, src.data(), 16).code(), EFAULT);
  EXPECT_EQ(rt_->deliver(a.data(), src.data(), SIZE_MAX).code(), EFAULT);          // size overflows
  auto m = rt_->mapped_alloc(4096);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(rt_->deliver(m->device, src.data(), 16).code(), EFAULT);               // mapped, not device_alloc
  rt_->mapped_free(m->host);
  const gpusock::RuntimeStats after = rt_->stats();
  EXPECT_EQ(after.deliveries - before.deliveries, 2u);
  EXPECT_EQ(after.delivered_bytes - before.delivered_bytes, kA + 5000);
  EXPECT_EQ(a.to_host(), std::vector<uint8_t>(src.begin(), src.begin() + kA));
  std::vector<uint8_t> want(kN, 0);
  std::copy(src.begin(), src.begin() + 5000, want.begin() + 1000);
  EXPECT_EQ(b.to_host(), want);
  // Started, then waited for.
  std::vector<uint8_t> src2(kN);
  for (size_t i = 0; i < kN; ++i) src2[i] = static_cast<uint8_t>(i * 13 + 5);
  ASSERT_TRUE(rt_->start_delivery(b.data(), src2.data(), kN / 2).ok());
  ASSERT_TRUE(rt_->start_delivery(b.data() + kN / 2, src2.data() + kN / 2, kN / 2).ok());
  EXPECT_EQ(rt_->start_delivery(b.data() + 1, src2.data(), kN).code(), EFAULT);
  ASSERT_TRUE(rt_->finish_deliveries().ok());
  EXPECT_EQ(b.to_host(), src2);
  // Freed: refused.
  void* p = rt_->device_alloc(4096).value();
  ASSERT_TRUE(rt_->deliver(p, src.data(), 4096).ok());
  void* q = rt_->device_alloc(4096).value();
  EXPECT_EQ(rt_->device_free(static_cast<uint8_t*>(q) + 8).code(), ENOENT);  // inside, not the start
  EXPECT_TRUE(rt_->deliver(q, src.data(), 4096).ok()) << "a refused free left the allocation alone";
  EXPECT_TRUE(rt_->device_free(q).ok());
  EXPECT_TRUE(rt_->device_free(p).ok());
  EXPECT_EQ(rt_->device_free(p).code(), ENOENT) << "a second free";
  EXPECT_EQ(rt_->deliver(p, src.data(), 16).code(), EFAULT);
}

// Memory the program allocated itself takes deliveries while registered, with the same
// range rule as an allocation; overlaps, empty ranges and (on a GPU) host memory are
// refused; after unregistering, deliveries into it are refused again.
TEST_P(HostcallTest, RegisteredMemoryTakesDeliveriesUntilUnregistered) {
  Start();
  constexpr size_t kN = 64 * 1024;
  const bool gpu = GetParam() == gpusock::DeviceKind::kCuda;
  uint8_t* mem = nullptr;
  std::vector<uint8_t> host_mem;
#if defined(GPUSOCK_HAVE_CUDA)
  if (gpu) ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&mem), kN), cudaSuccess);
#endif
  if (!gpu) {
    host_mem.resize(kN);
    mem = host_mem.data();
  }
  ASSERT_NE(mem, nullptr);
  std::vector<uint8_t> src(kN);
  for (size_t i = 0; i < kN; ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  EXPECT_EQ(rt_->deliver(mem, src.data(), 16).code(), EFAULT);  // not registered yet
  ASSERT_TRUE(rt_->register_device_memory(mem, kN).ok());
  EXPECT_TRUE(rt_->is_device_memory(mem + 100, kN - 100));
  EXPECT_FALSE(rt_->is_device_memory(mem + 100, kN - 99));
  ASSERT_TRUE(rt_->deliver(mem + 10, src.data(), 1000).ok());
  EXPECT_EQ(rt_->deliver(mem + kN - 1, src.data(), 2).code(), EFAULT);  // runs past the end
  // Refused: overlaps (inside it, and an allocation), empty and null ranges.
  EXPECT_EQ(rt_->register_device_memory(mem + kN - 16, 16).code(), EEXIST);
  EXPECT_EQ(rt_->register_device_memory(mem, kN).code(), EEXIST);
  auto a = Buffer<uint8_t>(4096);
  EXPECT_EQ(rt_->register_device_memory(a.data() + 100, 16).code(), EEXIST);
  EXPECT_EQ(rt_->register_device_memory(mem, 0).code(), EINVAL);
  EXPECT_EQ(rt_->register_device_memory(nullptr, 16).code(), EINVAL);
  if (gpu) {
    EXPECT_EQ(rt_->register_device_memory(src.data(), 16).code(), EINVAL);  // host memory
  }
  EXPECT_EQ(rt_->unregister_device_memory(mem + 1).code(), ENOENT);
  EXPECT_EQ(rt_->unregister_device_memory(a.data()).code(), ENOENT);  // an allocation
  // The runtime does not free what it did not allocate: the range stays registered.
  EXPECT_EQ(rt_->device_free(mem).code(), EINVAL);
  EXPECT_TRUE(rt_->is_device_memory(mem, kN));
  std::vector<uint8_t> back(kN);
  ASSERT_TRUE(rt_->copy_from_device(back.data(), mem, kN).ok());
  EXPECT_TRUE(std::equal(src.begin(), src.begin() + 1000, back.begin() + 10));
  ASSERT_TRUE(rt_->unregister_device_memory(mem).ok());
  EXPECT_EQ(rt_->deliver(mem + 10, src.data(), 16).code(), EFAULT);
  EXPECT_FALSE(rt_->is_device_memory(mem, 1));
  EXPECT_EQ(rt_->unregister_device_memory(mem).code(), ENOENT);
  EXPECT_TRUE(a.to_host() == std::vector<uint8_t>(4096, 0));  // the allocation is untouched
#if defined(GPUSOCK_HAVE_CUDA)
  if (gpu) cudaFree(mem);
#endif
}

// Tickets: a thread's started deliveries end in the order they started, and finishing one
// waits for it and every earlier one, also after its event was reused by later ones. The
// sources are pinned (a DMA reads them while the thread goes on), so a finish that did
// not wait would let the overwrites below reach the device.
TEST_P(HostcallTest, FinishingADeliveryByTicketWaitsForItAndEveryEarlierOne) {
  Start();
  constexpr size_t kPiece = 2u << 20, kPieces = 16;
  auto dev = Buffer<uint8_t>(kPiece * kPieces);
  auto m = rt_->mapped_alloc(kPiece * kPieces);
  ASSERT_TRUE(m.ok());
  uint8_t* src = static_cast<uint8_t*>(m->host);
  auto value = [](size_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 13); };
  for (size_t i = 0; i < kPiece * kPieces; ++i) src[i] = value(i);
  std::vector<uint64_t> t(kPieces);
  auto start = [&](size_t k) {
    ASSERT_TRUE(rt_->start_delivery(dev.data() + k * kPiece, src + k * kPiece, kPiece, &t[k]).ok());
  };
  auto spoil = [&](size_t k) { std::memset(src + k * kPiece, 0xEE, kPiece); };
  for (size_t k = 0; k < 6; ++k) start(k);
  if (GetParam() == gpusock::DeviceKind::kCuda) {
    for (size_t k = 1; k < 6; ++k) EXPECT_EQ(t[k], t[k - 1] + 1);  // numbered in order
  } else {
    for (size_t k = 0; k < 6; ++k) EXPECT_EQ(t[k], 0u);  // made at once
  }
  ASSERT_TRUE(rt_->finish_deliveries(t[2]).ok());
  for (size_t k = 0; k <= 2; ++k) spoil(k);
  for (size_t k = 6; k < kPieces; ++k) start(k);
  ASSERT_TRUE(rt_->finish_deliveries(t[4]).ok());  // ten later copies reused its event
  for (size_t k = 3; k <= 4; ++k) spoil(k);
  ASSERT_TRUE(rt_->finish_deliveries().ok());
  const std::vector<uint8_t> got = dev.to_host();
  size_t wrong = 0;
  for (size_t i = 0; i < got.size(); ++i) wrong += got[i] != value(i);
  EXPECT_EQ(wrong, 0u);
  rt_->mapped_free(m->host);
}

// start_fetch() copies out of device memory on the thread's copy stream, numbered with
// its deliveries: a ticket finished means that fetch and every earlier one have landed in
// host memory. Only out of device_alloc() memory (EFAULT elsewhere), and counted.
TEST_P(HostcallTest, FetchesCopyOutOfDeviceMemoryInTicketOrder) {
  Start();
  constexpr size_t kPiece = 1u << 20, kPieces = 16;
  auto value = [](size_t i) { return static_cast<uint8_t>((i * 2654435761u) >> 11); };
  std::vector<uint8_t> want(kPiece * kPieces);
  for (size_t i = 0; i < want.size(); ++i) want[i] = value(i);
  auto dev = Buffer<uint8_t>(want.size());
  ASSERT_TRUE(rt_->copy_to_device(dev.data(), want.data(), want.size()).ok());
  auto m = rt_->mapped_alloc(want.size());
  ASSERT_TRUE(m.ok());
  uint8_t* dst = static_cast<uint8_t*>(m->host);
  auto spare = Buffer<uint8_t>(64);
  const uint8_t spare_src[64] = {};
  const gpusock::RuntimeStats before = rt_->stats();
  std::vector<uint64_t> t(kPieces);
  uint64_t delivery = 0;
  for (size_t k = 0; k < kPieces; ++k) {
    ASSERT_TRUE(rt_->start_fetch(dst + k * kPiece, dev.data() + k * kPiece, kPiece, &t[k]).ok());
    if (k == 7) ASSERT_TRUE(rt_->start_delivery(spare.data(), spare_src, sizeof spare_src, &delivery).ok());
  }
  if (GetParam() == gpusock::DeviceKind::kCuda) {
    EXPECT_EQ(delivery, t[7] + 1);  // one sequence for both directions
    EXPECT_EQ(t[8], delivery + 1);
    for (size_t k = 1; k < 8; ++k) EXPECT_EQ(t[k], t[k - 1] + 1);
  } else {
    for (size_t k = 0; k < kPieces; ++k) EXPECT_EQ(t[k], 0u);  // made at once
  }
  ASSERT_TRUE(rt_->finish_deliveries(t[7]).ok());
  size_t wrong = 0;
  for (size_t i = 0; i < 8 * kPiece; ++i) wrong += dst[i] != want[i];
  EXPECT_EQ(wrong, 0u) << "bytes of the first eight fetches missing after their tickets finished";
  for (size_t k = 0; k < 8; ++k) EXPECT_TRUE(rt_->deliveries_done(t[k])) << "ticket " << k << " was finished";
  // deliveries_done() does not wait; once it says the last ticket is done, every copy up
  // to it has ended and its bytes are in place.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!rt_->deliveries_done(t[kPieces - 1]) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
  ASSERT_TRUE(rt_->deliveries_done(t[kPieces - 1]));
  wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) wrong += dst[i] != want[i];
  EXPECT_EQ(wrong, 0u) << "bytes missing after deliveries_done() said the copies had ended";
  ASSERT_TRUE(rt_->finish_deliveries().ok());
  wrong = 0;
  for (size_t i = 0; i < want.size(); ++i) wrong += dst[i] != want[i];
  EXPECT_EQ(wrong, 0u);
  const gpusock::RuntimeStats after = rt_->stats();
  EXPECT_EQ(after.fetches - before.fetches, kPieces);
  EXPECT_EQ(after.fetched_bytes - before.fetched_bytes, kPiece * kPieces);
  // Never out of memory the runtime did not hand out or have registered.
  uint64_t ticket = 99;
  EXPECT_EQ(rt_->start_fetch(dst, dev.data() + want.size() - 10, 20, &ticket).code(), EFAULT);
  EXPECT_EQ(ticket, 0u);
  EXPECT_EQ(rt_->start_fetch(dst, want.data(), 20).code(), EFAULT);
  EXPECT_EQ(rt_->stats().fetches, after.fetches);
  rt_->mapped_free(m->host);
}

TEST_P(HostcallTest, LaunchRejectsBadDimensions) {
  Start();
  auto out = Buffer<int64_t>(1);
  EXPECT_EQ(gpusock::launch(*rt_, {1}, {2048}, CallOne{}, out.data(), kOpEcho).status().code(), EINVAL);
  EXPECT_EQ(gpusock::launch(*rt_, {0}, {32}, CallOne{}, out.data(), kOpEcho).status().code(), EINVAL);
}

}  // namespace
