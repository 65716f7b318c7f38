// Shared by the socket test suites: the mailbox kernels and the host talk through, a
// stream hash, and the fixture that runs each case on the cpu device and on a GPU.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(GPUSOCK_HAVE_CUDA)
#include <cuda_runtime.h>
#endif

#include "gpusock/hostcall/device_buffer.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "gpusock/hostcall/runtime.hpp"

namespace gpusock::testing {

inline constexpr auto kKernelTimeout = std::chrono::seconds(300);

GPUSOCK_HD inline uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Words in mapped memory that kernels publish (ports, progress) and the host reads.
struct Mailbox {
  uint32_t* host = nullptr;
  uint32_t* dev = nullptr;
};
GPUSOCK_HD inline void publish(uint32_t* box, uint32_t i, uint32_t v) {
  // Release, system scope: the host that sees the value sees what the kernel did before.
  AtomicRef<uint32_t, Scope::kSystem>(box[i]).store(v, Order::kRelease);
}
GPUSOCK_HD inline uint32_t read_box(uint32_t* box, uint32_t i) {
  return AtomicRef<uint32_t, Scope::kSystem>(box[i]).load(Order::kAcquire);
}
// Waits for box[i] to become nonzero. The backoff matters on the cpu device, where every
// lane is a thread: a thousand lanes spinning flat out starve the one lane they wait for.
GPUSOCK_HD inline uint32_t await_box(uint32_t* box, uint32_t i) {
  uint32_t v;
  for (uint32_t n = 0; (v = read_box(box, i)) == 0; ++n) backoff(n);
  return v;
}

// Memory a program allocated itself, not through the runtime: cudaMalloc on a GPU,
// operator new on the cpu device (where kernels are host threads). For
// Runtime::register_device_memory().
class ForeignMemory {
 public:
  ForeignMemory(DeviceKind kind, size_t bytes) : cuda_(kind == DeviceKind::kCuda) {
#if defined(GPUSOCK_HAVE_CUDA)
    if (cuda_) {
      if (cudaMalloc(&p_, bytes) != cudaSuccess) p_ = nullptr;
      return;
    }
#endif
    p_ = ::operator new(bytes);
  }
  ~ForeignMemory() {
#if defined(GPUSOCK_HAVE_CUDA)
    if (cuda_) {
      cudaFree(p_);
      return;
    }
#endif
    ::operator delete(p_);
  }
  ForeignMemory(const ForeignMemory&) = delete;
  ForeignMemory& operator=(const ForeignMemory&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(p_); }

 private:
  bool cuda_;
  void* p_ = nullptr;
};

// Each case runs with GetParam() as the device; a GPU case skips, with the reason, where
// there is no GPU. Start the runtime with StartRuntime() (a suite's own Start() adds its
// modules), then Launch/Finish kernels and talk to them through box_.
class KernelTest : public ::testing::TestWithParam<DeviceKind> {
 protected:
  void SetUp() override {
    if (GetParam() == DeviceKind::kCuda && !cuda_available()) {
      GTEST_SKIP() << "no usable GPU here (cudaGetDeviceCount found none); the cpu-device run covers this test";
    }
    opts_.device = GetParam();
  }
  // Creates the runtime and the mailbox.
  void StartRuntime() {
    auto rt = Runtime::create(opts_);
    ASSERT_TRUE(rt.ok()) << rt.status().to_string();
    rt_ = std::move(rt.value());
    auto m = rt_->mapped_alloc(4096);
    ASSERT_TRUE(m.ok());
    // Freed with the runtime, after its kernels stop: a kernel left running by a failed
    // assertion may still write here during TearDown.
    rt_->mapped_free_at_exit(m->host);
    box_.host = static_cast<uint32_t*>(m->host);
    box_.dev = static_cast<uint32_t*>(m->device);
  }
  template <typename K, typename... A>
  gpusock::Launch Launch(Dim3 grid, Dim3 block, K k, A... a) {
    auto l = gpusock::launch(*rt_, grid, block, k, a...);
    EXPECT_TRUE(l.ok()) << l.status().to_string();
    return std::move(l.value());
  }
  void Finish(gpusock::Launch& l, std::chrono::seconds limit = kKernelTimeout) {
    if (!l.wait_for(limit)) {
      rt_->shutdown();
      l.wait_for(std::chrono::seconds(60));
      FAIL() << "kernel did not finish within " << limit.count() << " s";
    }
    Status s = l.wait();
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
  // Waits for mailbox word i to become non-zero; returns it (0 on timeout).
  uint32_t Await(uint32_t i, std::chrono::seconds limit = std::chrono::seconds(60)) {
    auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      uint32_t v = std::atomic_ref<uint32_t>(box_.host[i]).load(std::memory_order_acquire);
      if (v != 0) return v;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    return 0;
  }
  void Post(uint32_t i, uint32_t v) { std::atomic_ref<uint32_t>(box_.host[i]).store(v, std::memory_order_release); }
  template <typename T>
  DeviceBuffer<T> Buffer(size_t n) {
    auto b = DeviceBuffer<T>::create(*rt_, n);
    EXPECT_TRUE(b.ok()) << b.status().to_string();
    return std::move(b.value());
  }
  template <typename T>
  std::vector<T> Read(DeviceBuffer<T>& b) {
    return b.to_host();
  }

  RuntimeOptions opts_;
  std::unique_ptr<Runtime> rt_;
  Mailbox box_;
};

// The test name suffix: "cpu" or "cuda".
inline std::string device_name(const ::testing::TestParamInfo<DeviceKind>& info) { return to_string(info.param); }

}  // namespace gpusock::testing
