// gpusock/hostcall/launch.hpp — one launch API for both devices.
//
// A kernel is any copyable callable marked GPUSOCK_HD (a functor, or an extended
// __host__ __device__ lambda). It is written once; the runtime's device decides whether
// it runs as a CUDA grid or as cpu-device lanes:
//
//   struct Hello {
//     GPUSOCK_HD void operator()(int* out) const { out[gpusock::global_thread_id()] = 1; }
//   };
//   auto k = gpusock::launch(*rt, {8}, {128}, Hello{}, out);
//   if (!k.ok()) return k.status();
//   gpusock::Status s = k->wait();
//
// Launches are asynchronous and may run concurrently (each has its own CUDA stream, or
// its own lane threads on the cpu device). To run on a GPU the calling translation unit
// must be compiled by nvcc; a g++-compiled unit launches on the cpu device only.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <utility>

#include "gpusock/hostcall/client.hpp"
#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/status.hpp"
#include "gpusock/hostcall/warp.hpp"

namespace gpusock {

namespace internal {
struct LaunchState;
Result<std::shared_ptr<LaunchState>> cpu_launch(Runtime& rt, Dim3 grid, Dim3 block,
                                                std::function<void()> lane_body);
#if defined(__CUDACC__) && defined(GPUSOCK_HAVE_CUDA)
// What a kernel needs to know about its launch (platform.hpp, gpusock_launch_*).
struct CudaLaunchIds {
  uint32_t id = 0;              // 1..hostcall::kLaunchIds-1
  uint32_t* abort = nullptr;    // device memory
  uint32_t* cause = nullptr;    // mapped host memory, device address
};
// Checks dimensions, takes a launch id and creates the launch's stream.
Status cuda_launch_begin(Runtime& rt, Dim3 grid, Dim3 block, void** stream, CudaLaunchIds* ids);
// Wraps a launched stream (or the launch error) into a handle; on a launch error the id
// goes back at once.
Result<std::shared_ptr<LaunchState>> cuda_launch_end(Runtime& rt, void* stream, const CudaLaunchIds& ids,
                                                     int launch_error);
#endif
Status no_cuda_in_this_unit();
}  // namespace internal

// A running (or finished) kernel.
class Launch {
 public:
  explicit Launch(std::shared_ptr<internal::LaunchState> s) : s_(std::move(s)) {}
  // Waits for the kernel to finish. Returns ok, or the device's error (a trap, a fault).
  Status wait();
  // Waits at most `timeout`; true once the kernel has finished (then wait() returns at once).
  bool wait_for(std::chrono::nanoseconds timeout);

 private:
  std::shared_ptr<internal::LaunchState> s_;
};

#if defined(__CUDACC__) && defined(GPUSOCK_HAVE_CUDA)
namespace internal {
template <typename Kernel, typename... Args>
__global__ void gpusock_entry(const hostcall::DeviceContext* ctx, CudaLaunchIds ids, Kernel kernel, Args... args) {
  __shared__ bool skip;
  // The block's copy of the context, 16 bytes a thread by the first warp's threads (all of
  // the block's when it has fewer).
  static_assert(sizeof(hostcall::DeviceContext) % 16 == 0 && alignof(hostcall::DeviceContext) >= 16);
  const uint32_t t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const uint32_t threads = blockDim.x * blockDim.y * blockDim.z, copiers = threads < 32 ? threads : 32;
  constexpr uint32_t kWords = sizeof(hostcall::DeviceContext) / 16;
  for (uint32_t i = t; t < copiers && i < kWords; i += copiers) {
    reinterpret_cast<uint4*>(&hostcall::gpusock_kernel_context)[i] = reinterpret_cast<const uint4*>(ctx)[i];
  }
  if (t == 0) {
    gpusock_launch_id = ids.id;
    gpusock_launch_abort = ids.abort;
    gpusock_launch_cause = ids.cause;
    gpusock_launch_grid = grid_id();
    for (uint32_t& w : gpusock_stop_holds) w = 0;
    // A block that starts after a lane called trap() never runs the kernel.
    skip = launch_aborted();
  }
  // Every thread of the block must see the context before its first hostcall.
  __syncthreads();
  if (skip) return;
  kernel(args...);
}
}  // namespace internal
#endif

// Launches `kernel(args...)` over `grid` blocks of `block` threads on the runtime's
// device. Returns the running kernel, or EINVAL (bad dimensions), ENODEV, ESHUTDOWN.
template <typename Kernel, typename... Args>
Result<Launch> launch(Runtime& rt, Dim3 grid, Dim3 block, Kernel kernel, Args... args) {
  if (rt.device() == DeviceKind::kCuda) {
#if defined(__CUDACC__) && defined(GPUSOCK_HAVE_CUDA)
    void* stream = nullptr;
    internal::CudaLaunchIds ids;
    Status s = internal::cuda_launch_begin(rt, grid, block, &stream, &ids);
    if (!s.ok()) return s;
    internal::gpusock_entry<Kernel, Args...>
        <<<dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), 0,
           static_cast<cudaStream_t>(stream)>>>(rt.device_context(), ids, kernel, args...);
    auto r = internal::cuda_launch_end(rt, stream, ids, static_cast<int>(cudaGetLastError()));
    if (!r.ok()) return r.status();
    return Launch(std::move(r.value()));
#else
    return internal::no_cuda_in_this_unit();
#endif
  }
  auto r = internal::cpu_launch(rt, grid, block, [kernel, args...]() { kernel(args...); });
  if (!r.ok()) return r.status();
  return Launch(std::move(r.value()));
}

}  // namespace gpusock
