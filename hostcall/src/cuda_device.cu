// The cuda device: mapped pinned memory for the hostcall region, device memory for the
// allocation state, one stream per launch, and the clock calibration kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <mutex>
#include <thread>
#include <vector>

#include "core.hpp"
#include "gpusock/hostcall/launch.hpp"
#include "launch_state.hpp"

namespace gpusock {

namespace {
// Kernels launched on one runtime wait for each other through the host: a server kernel
// spins until a client kernel, launched after it, connects. With CUDA's lazy loading (the
// default on Linux since CUDA 12.2) a kernel's code is loaded at its first launch, and
// that load may wait for the kernels already running to end, which they never do: the
// new kernel never starts. So unless the program has chosen (CUDA_MODULE_LOADING set),
// gpusock asks for eager loading, before main() and so before anything initializes CUDA.
// docs/architecture.md, section 2.
__attribute__((constructor)) void prefer_eager_module_loading() { ::setenv("CUDA_MODULE_LOADING", "EAGER", 0); }
}  // namespace

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

// What one give-back kernel takes back; passed by value as its parameter (about 2 KiB), so
// that nothing has to be allocated or copied for it. More goes in several launches.
struct GiveBackChunk {
  static constexpr uint32_t kSlots = 256, kRuns = 128;
  uint32_t nslots = 0, nruns = 0;
  uint32_t slots[kSlots];
  uint64_t runs[kRuns];  // first << 32 | count
};

// Clears each slot's claim record if it still names `launch`, then the slot's bit, and
// each staging run's bits: what release_slot() and release_staging() would have done had
// the launch's lanes not stopped. The fence orders our clear of a record before the bit
// that lets the slot's next owner write its own.
__global__ void give_back_kernel(uint32_t* slot_bitmap, unsigned long long* staging_bitmap, hostcall::ClaimRecord* claims,
                                 uint32_t launch, GiveBackChunk c) {
  for (uint32_t i = threadIdx.x; i < c.nruns; i += blockDim.x) {
    const uint32_t first = static_cast<uint32_t>(c.runs[i] >> 32), count = static_cast<uint32_t>(c.runs[i]);
    const unsigned long long run = hostcall::staging_run_bits(count);
    atomicAnd(&staging_bitmap[first / 64], ~(run << (first % 64)));
  }
  for (uint32_t i = threadIdx.x; i < c.nslots; i += blockDim.x) {
    const uint32_t slot = c.slots[i];
    if (launch != 0) atomicCAS(&claims[slot].launch, launch, 0u);
    __threadfence();
    atomicAnd(&slot_bitmap[slot / 32], ~(1u << (slot % 32)));
  }
}

}  // namespace

class CudaBackend : public DeviceBackend {
 public:
  ~CudaBackend() override {
    if (give_back_stream_ != nullptr) {
      bind();
      cudaStreamDestroy(give_back_stream_);
    }
  }
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
  // The calling thread's copy stream for this backend, with an event recorded after each
  // of its last kCopyEvents copies: copy t's event is events[t % kCopyEvents] until copy
  // t + kCopyEvents reuses it. copy_stream() makes it when `make`, else returns null.
  static constexpr uint64_t kCopyEvents = 8;
  struct CopyStream {
    uint64_t owner = 0;
    cudaStream_t stream = nullptr;
    cudaEvent_t events[kCopyEvents] = {};
    uint64_t next = 1;  // the next copy's ticket
    ~CopyStream() { drop(true); }
    void drop(bool destroy) {
      for (auto& e : events) {
        if (destroy && e != nullptr) cudaEventDestroy(e);
        e = nullptr;
      }
      if (destroy && stream != nullptr) cudaStreamDestroy(stream);
      stream = nullptr;
      next = 1;
    }
  };
  CopyStream* copy_stream(bool make = true) {
    thread_local CopyStream local;
    if (local.owner == id_ && local.stream != nullptr) {
      bind();
      return &local;
    }
    if (!make) return nullptr;
    bind();
    // A stream of an earlier runtime on this thread: its device may have been reset since,
    // so it is dropped, not destroyed.
    local.drop(false);
    if (cudaStreamCreateWithFlags(&local.stream, cudaStreamNonBlocking) != cudaSuccess) {
      local.stream = nullptr;
      return nullptr;
    }
    for (auto& e : local.events) {
      if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess) {
        local.drop(true);
        return nullptr;
      }
    }
    local.owner = id_;
    return &local;
  }
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
  // Each thread's copies go on a stream of its own (non-blocking: never ordered behind
  // kernels), made at its first copy and destroyed when the thread ends.
  Status start_copy_to_device(void* dev, const void* host, size_t bytes, uint64_t* ticket) override {
    return start_copy(dev, host, bytes, cudaMemcpyHostToDevice, ticket);
  }
  Status start_copy_from_device(void* host, const void* dev, size_t bytes, uint64_t* ticket) override {
    return start_copy(host, dev, bytes, cudaMemcpyDeviceToHost, ticket);
  }
  Status start_copy(void* to, const void* from, size_t bytes, cudaMemcpyKind dir, uint64_t* ticket) {
    *ticket = 0;
    CopyStream* c = copy_stream();
    if (c == nullptr) return dir == cudaMemcpyHostToDevice ? copy_to_device(to, from, bytes) : copy_from_device(to, from, bytes);
    cudaError_t e = cudaMemcpyAsync(to, from, bytes, dir, c->stream);
    if (e != cudaSuccess) return cuda_status(e, "cudaMemcpyAsync");
    e = cudaEventRecord(c->events[c->next % kCopyEvents], c->stream);
    if (e != cudaSuccess) return cuda_status(e, "cudaEventRecord");
    *ticket = c->next++;
    return {};
  }
  Status finish_copies(uint64_t ticket) override {
    CopyStream* c = copy_stream(false);
    if (c == nullptr || ticket == 0) return {};  // 0: a copy made at once
    if (ticket >= c->next) {
      const cudaError_t e = cudaStreamSynchronize(c->stream);
      return e == cudaSuccess ? Status{} : cuda_status(e, "cudaStreamSynchronize");
    }
    const cudaError_t e = cudaEventSynchronize(event_of(c, ticket));
    return e == cudaSuccess ? Status{} : cuda_status(e, "cudaEventSynchronize");
  }
  bool copies_done(uint64_t ticket) override {
    CopyStream* c = copy_stream(false);
    if (c == nullptr || ticket == 0) return true;
    if (ticket >= c->next) return cudaStreamQuery(c->stream) == cudaSuccess;
    return cudaEventQuery(event_of(c, ticket)) == cudaSuccess;  // cudaErrorNotReady: still running
  }
  // The event whose end implies the end of copy `ticket` (< c->next): its own, or, where a
  // later copy reused it, the oldest event still recorded, which ended after it.
  static cudaEvent_t event_of(const CopyStream* c, uint64_t ticket) {
    const uint64_t t = std::max(ticket, c->next > kCopyEvents ? c->next - kCopyEvents : uint64_t{1});
    return c->events[t % kCopyEvents];
  }
  Status check_device_range(const void* p, size_t bytes) override {
    for (const uint8_t* end : {static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + bytes - 1}) {
      cudaPointerAttributes a{};
      const cudaError_t e = cudaPointerGetAttributes(&a, end);
      if (e != cudaSuccess) {
        cudaGetLastError();  // not sticky; clear it
        return Status(EINVAL, std::string("register_device_memory: cudaPointerGetAttributes: ") + cudaGetErrorName(e));
      }
      const bool ok = (a.type == cudaMemoryTypeDevice && a.device == device_) || a.type == cudaMemoryTypeManaged;
      if (!ok) {
        return Status(EINVAL, "register_device_memory: not device or managed memory of device " + std::to_string(device_));
      }
    }
    return {};
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
  bool give_back(uint32_t* slot_bitmap, uint64_t* staging_bitmap, hostcall::ClaimRecord* claims, uint32_t launch,
                 const std::vector<uint32_t>& slots, const std::vector<uint64_t>& runs) override;

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
  // The give-back kernels' own stream, made at first use (guarded by give_back_mu_).
  std::mutex give_back_mu_;
  cudaStream_t give_back_stream_ = nullptr;
  // Tells this backend's copy streams from those of earlier ones on the same thread.
  static inline std::atomic<uint64_t> next_id_{1};
  const uint64_t id_ = next_id_.fetch_add(1);
};

namespace {
struct CudaLaunch : LaunchState {
  std::mutex mu;
  cudaStream_t stream = nullptr;
  uint32_t id = 0;  // hostcall::kLaunchIds; given back once the launch has ended
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
    } else if (auto c = core.lock()) {
      // A lane that called gpusock::trap() ended the launch early: report where, and take
      // back what the launch held before anyone learns that it has ended.
      Status why;
      if (c->finish_launch(id, &why)) result = why;
    }
    id = 0;
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
  {
    std::lock_guard<std::mutex> gl(give_back_mu_);
    if (give_back_stream_ != nullptr) cudaStreamDestroy(give_back_stream_);
    give_back_stream_ = nullptr;
  }
  cudaDeviceReset();
}

bool CudaBackend::give_back(uint32_t* slot_bitmap, uint64_t* staging_bitmap, hostcall::ClaimRecord* claims,
                            uint32_t launch, const std::vector<uint32_t>& slots, const std::vector<uint64_t>& runs) {
  std::lock_guard<std::mutex> lock(give_back_mu_);
  bind();
  if (give_back_stream_ == nullptr && cudaStreamCreateWithFlags(&give_back_stream_, cudaStreamNonBlocking) != cudaSuccess) {
    give_back_stream_ = nullptr;
    return false;
  }
  size_t si = 0, ri = 0;
  while (si < slots.size() || ri < runs.size()) {
    GiveBackChunk c;
    while (si < slots.size() && c.nslots < GiveBackChunk::kSlots) c.slots[c.nslots++] = slots[si++];
    while (ri < runs.size() && c.nruns < GiveBackChunk::kRuns) c.runs[c.nruns++] = runs[ri++];
    give_back_kernel<<<1, 256, 0, give_back_stream_>>>(slot_bitmap, reinterpret_cast<unsigned long long*>(staging_bitmap),
                                                        claims, launch, c);
    if (cudaGetLastError() != cudaSuccess) return false;
  }
  // A one-block kernel starts as soon as any SM has room. Kernels that fill every SM and
  // never end would keep it queued: stop waiting after a while rather than hang the
  // caller (Launch::wait); the slots come back when it runs.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    cudaError_t e = cudaStreamQuery(give_back_stream_);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) return false;
    if (std::chrono::steady_clock::now() >= deadline) {
      std::fprintf(stderr, "gpusock: an aborted launch's slots are not back after 5 s: every SM is busy; they come back "
                           "when a kernel ends\n");
      return true;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
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

Status cuda_launch_begin(Runtime& rt, Dim3 grid, Dim3 block, void** stream, CudaLaunchIds* ids) {
  if (rt.core().failed()) return rt.core().health();
  if (rt.is_shut_down()) return {ESHUTDOWN, "runtime is shut down"};
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024) return {EINVAL, "block must have 1..1024 threads"};
  if (uint64_t{grid.x} * grid.y * grid.z == 0) return {EINVAL, "grid must have at least one block"};
  static_cast<CudaBackend&>(rt.core().device()).bind();
  Status st = rt.core().take_launch_id(&ids->id, &ids->abort, &ids->cause);
  if (!st.ok()) {
    // Ended launches give their ids back when someone looks at them: look, and try again.
    (void)rt.core().device().kernels_running();
    st = rt.core().take_launch_id(&ids->id, &ids->abort, &ids->cause);
    if (!st.ok()) return st;
  }
  cudaStream_t s = nullptr;
  cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (e != cudaSuccess) {
    rt.core().give_launch_id(ids->id);
    return launch_failure(rt, e, "cudaStreamCreate");
  }
  *stream = s;
  return {};
}

Result<std::shared_ptr<LaunchState>> cuda_launch_end(Runtime& rt, void* stream, const CudaLaunchIds& ids,
                                                     int launch_error) {
  auto l = std::make_shared<CudaLaunch>();
  l->stream = static_cast<cudaStream_t>(stream);
  l->core = rt.core().self();
  if (launch_error != cudaSuccess) {
    rt.core().give_launch_id(ids.id);
    return launch_failure(rt, static_cast<cudaError_t>(launch_error), "kernel launch");
  }
  l->id = ids.id;
  static_cast<CudaBackend&>(rt.core().device()).track(l);
  return std::shared_ptr<LaunchState>(l);
}

}  // namespace internal
}  // namespace gpusock
