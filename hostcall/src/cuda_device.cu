// The cuda device: mapped pinned memory for the hostcall region, device memory for the
// allocation state, one stream per launch, and the clock calibration kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <mutex>
#include <thread>
#include <vector>

#include "core.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "launch_state.hpp"

namespace gpusock {

bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

namespace internal {
namespace {

Status cuda_status(cudaError_t e, const char* what) {
  return {e == cudaErrorMemoryAllocation ? ENOMEM : EIO,
          std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")"};
}

int64_t clock_ns(clockid_t c) {
  timespec ts;
  ::clock_gettime(c, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

__global__ void read_globaltimer(uint64_t* out) { *out = globaltimer_ns(); }

__global__ void read_nsmid(uint32_t* out) {
  uint32_t n;
  asm volatile("mov.u32 %0, %%nsmid;" : "=r"(n));
  *out = n;
}

struct CudaLaunch;

}  // namespace

class CudaBackend : public DeviceBackend {
 public:
  Status init(int device) {
    device_ = device;
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return cuda_status(e, "cudaSetDevice");
    e = cudaGetDeviceProperties(&props_, device);
    if (e != cudaSuccess) return cuda_status(e, "cudaGetDeviceProperties");
    if (!props_.canMapHostMemory) return {ENODEV, "GPU cannot map host memory"};
    // %nsmid can exceed the SM count; errno slots are indexed by %smid.
    uint32_t* d = nullptr;
    e = cudaMalloc(&d, sizeof(uint32_t));
    if (e != cudaSuccess) return cuda_status(e, "cudaMalloc");
    read_nsmid<<<1, 1>>>(d);
    e = cudaMemcpy(&nsmid_, d, sizeof(uint32_t), cudaMemcpyDeviceToHost);
    cudaFree(d);
    if (e != cudaSuccess) return cuda_status(e, "reading %nsmid");
    nsmid_ = std::max<uint32_t>(nsmid_, static_cast<uint32_t>(props_.multiProcessorCount));
    return {};
  }
  // CUDA's current device is per host thread: every entry point that may run on a thread
  // other than the creator's selects ours first.
  void bind() const { cudaSetDevice(device_); }
  DeviceKind kind() const override { return DeviceKind::kCuda; }
  std::string name() const override {
    return std::string(props_.name) + " (sm_" + std::to_string(props_.major) + std::to_string(props_.minor) +
           ", " + std::to_string(props_.multiProcessorCount) + " SMs)";
  }
  Status alloc_mapped(size_t bytes, void** host, void** dev) override {
    bind();
    cudaError_t e = cudaHostAlloc(host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess) return cuda_status(e, "cudaHostAlloc");
    std::memset(*host, 0, bytes);
    e = cudaHostGetDevicePointer(dev, *host, 0);
    if (e != cudaSuccess) return cuda_status(e, "cudaHostGetDevicePointer");
    return {};
  }
  void free_mapped(void* host) override {
    bind();
    cudaFreeHost(host);
  }
  Status alloc_device(size_t bytes, void** dev) override {
    bind();
    cudaError_t e = cudaMalloc(dev, bytes);
    if (e != cudaSuccess) return cuda_status(e, "cudaMalloc");
    e = cudaMemset(*dev, 0, bytes);
    if (e != cudaSuccess) return cuda_status(e, "cudaMemset");
    return {};
  }
  void free_device(void* dev) override {
    bind();
    cudaFree(dev);
  }
  Status copy_to_device(void* dev, const void* host, size_t bytes) override {
    bind();
    cudaError_t e = cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? Status{} : cuda_status(e, "cudaMemcpy");
  }
  Status copy_from_device(void* host, const void* dev, size_t bytes) override {
    bind();
    cudaError_t e = cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? Status{} : cuda_status(e, "cudaMemcpy");
  }
  uint32_t max_resident_warps() const override {
    return static_cast<uint32_t>(props_.multiProcessorCount) * (props_.maxThreadsPerMultiProcessor / 32);
  }
  uint32_t sm_count() const override { return static_cast<uint32_t>(props_.multiProcessorCount); }
  uint32_t sm_ids() const override { return nsmid_; }
  uint32_t threads_per_sm() const override {
    // %warpid can reach the SM's warp-slot count, which is the thread limit / 32.
    return static_cast<uint32_t>(props_.maxThreadsPerMultiProcessor);
  }
  Status calibrate_clock(int64_t* mono, int64_t* real) override {
    bind();
    uint64_t* d = nullptr;
    cudaError_t e = cudaMalloc(&d, sizeof(uint64_t));
    if (e != cudaSuccess) return cuda_status(e, "cudaMalloc");
    // Several rounds; keep the one with the tightest host bracket around the GPU read.
    int64_t best_span = INT64_MAX;
    for (int i = 0; i < 8; ++i) {
      uint64_t g = 0;
      int64_t m0 = clock_ns(CLOCK_MONOTONIC);
      int64_t r0 = clock_ns(CLOCK_REALTIME);
      read_globaltimer<<<1, 1>>>(d);
      e = cudaMemcpy(&g, d, sizeof(g), cudaMemcpyDeviceToHost);
      int64_t m1 = clock_ns(CLOCK_MONOTONIC);
      if (e != cudaSuccess) break;
      if (m1 - m0 < best_span) {
        best_span = m1 - m0;
        *mono = (m0 + m1) / 2 - static_cast<int64_t>(g);
        *real = r0 + (m1 - m0) / 2 - static_cast<int64_t>(g);
      }
    }
    cudaFree(d);
    if (e != cudaSuccess) return cuda_status(e, "clock calibration");
    return {};
  }
  bool kernels_running() const override;
  bool wait_kernels(std::chrono::nanoseconds timeout) override;
  void reset_after_failure() override;

  void track(const std::shared_ptr<CudaLaunch>& l);

 private:
  int device_ = 0;
  uint32_t nsmid_ = 0;
  cudaDeviceProp props_{};
  mutable std::mutex mu_;
  // Strong references: a kernel keeps its launch tracked even after the caller drops
  // its Launch handle, so shutdown knows it still runs. Finished ones are pruned.
  mutable std::vector<std::shared_ptr<CudaLaunch>> launches_;
  // Every launch handle still alive, finished or not: after a device reset their streams
  // are gone, and they must not destroy them again (guarded by mu_).
  std::vector<std::weak_ptr<CudaLaunch>> handles_;
};

namespace {
struct CudaLaunch : LaunchState {
  std::mutex mu;
  cudaStream_t stream = nullptr;
  bool done = false;
  Status result;
  // Told when this kernel ends in an error: every such error (a trap, an illegal address,
  // a launch failure) is sticky and loses the context, so the runtime is failed.
  std::weak_ptr<Core> core;

  ~CudaLaunch() override {
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
  // Polls (or, with block, waits for) the stream; records the outcome once.
  bool check(bool block) {
    std::lock_guard<std::mutex> lock(mu);
    if (done) return true;
    cudaError_t e = block ? cudaStreamSynchronize(stream) : cudaStreamQuery(stream);
    if (e == cudaErrorNotReady) return false;
    done = true;
    if (e != cudaSuccess) {
      result = cuda_status(e, "kernel aborted (a trap or a fault); the CUDA context is lost");
      if (auto c = core.lock()) c->mark_failed(result);
    }
    return true;
  }
  bool wait(std::chrono::nanoseconds timeout) override {
    if (timeout.count() < 0) return check(true);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!check(false)) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return true;
  }
  Status status() override {
    std::lock_guard<std::mutex> lock(mu);
    return result;
  }
};
}  // namespace

bool CudaBackend::kernels_running() const {
  std::lock_guard<std::mutex> lock(mu_);
  bind();
  launches_.erase(std::remove_if(launches_.begin(), launches_.end(), [](auto& l) { return l->check(false); }),
                  launches_.end());
  return !launches_.empty();
}

bool CudaBackend::wait_kernels(std::chrono::nanoseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (kernels_running()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

void CudaBackend::track(const std::shared_ptr<CudaLaunch>& l) {
  std::lock_guard<std::mutex> lock(mu_);
  launches_.erase(std::remove_if(launches_.begin(), launches_.end(), [](auto& x) { return x->check(false); }),
                  launches_.end());
  launches_.push_back(l);
  handles_.erase(std::remove_if(handles_.begin(), handles_.end(), [](auto& w) { return w.expired(); }), handles_.end());
  handles_.push_back(l);
}

void CudaBackend::reset_after_failure() {
  std::lock_guard<std::mutex> lock(mu_);
  bind();
  // A sticky error poisons the context for the whole process: nothing but a reset of the
  // device brings it back. Streams die with it, so the handles forget theirs first.
  for (auto& w : handles_) {
    if (auto l = w.lock()) {
      std::lock_guard<std::mutex> ll(l->mu);
      if (l->stream != nullptr) cudaStreamDestroy(l->stream);
      l->stream = nullptr;
      l->done = true;
    }
  }
  handles_.clear();
  launches_.clear();
  cudaDeviceReset();
}

Result<std::unique_ptr<DeviceBackend>> make_cuda_backend(const RuntimeOptions& options) {
  if (!cuda_available()) {
    return Status(ENODEV, "device cuda was requested but no usable GPU was found (cudaGetDeviceCount)");
  }
  auto b = std::make_unique<CudaBackend>();
  Status s = b->init(options.cuda_device);
  if (!s.ok()) return s;
  return std::unique_ptr<DeviceBackend>(std::move(b));
}

namespace {
// A launch that fails may fail on an earlier kernel's sticky error, one nobody has looked
// at yet: check the launches we know of first (a failed one marks the runtime failed) and
// report the lost device, with its cause, rather than a bare launch error.
Status launch_failure(Runtime& rt, cudaError_t e, const char* what) {
  (void)rt.core().device().kernels_running();
  if (rt.core().failed()) return rt.core().health();
  return cuda_status(e, what);
}
}  // namespace

Status cuda_launch_begin(Runtime& rt, Dim3 grid, Dim3 block, void** stream) {
  if (rt.core().failed()) return rt.core().health();
  if (rt.is_shut_down()) return {ESHUTDOWN, "runtime is shut down"};
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024) return {EINVAL, "block must have 1..1024 threads"};
  if (uint64_t{grid.x} * grid.y * grid.z == 0) return {EINVAL, "grid must have at least one block"};
  static_cast<CudaBackend&>(rt.core().device()).bind();
  cudaStream_t s = nullptr;
  cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (e != cudaSuccess) return launch_failure(rt, e, "cudaStreamCreate");
  *stream = s;
  return {};
}

Result<std::shared_ptr<LaunchState>> cuda_launch_end(Runtime& rt, void* stream, int launch_error) {
  auto l = std::make_shared<CudaLaunch>();
  l->stream = static_cast<cudaStream_t>(stream);
  l->core = rt.core().self();
  if (launch_error != cudaSuccess) return launch_failure(rt, static_cast<cudaError_t>(launch_error), "kernel launch");
  static_cast<CudaBackend&>(rt.core().device()).track(l);
  return std::shared_ptr<LaunchState>(l);
}

}  // namespace internal
}  // namespace gpusock
