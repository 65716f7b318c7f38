// Can a process get a working CUDA context back after a kernel traps? Plain CUDA, no
// gpusock: a kernel __trap()s, the process calls cudaDeviceReset(), then tries to use the
// device again. gpusock's cuda-device recovery after a trap (docs/architecture.md,
// section 18.3) can be no better than what this program sees on a given machine.
//
// Build: nvcc -O2 -arch=sm_90 -o cuda_trap_probe scripts/cuda_trap_probe.cu
// Run:   ./cuda_trap_probe [0|1|2]
//   0: reset with the stream and the pinned buffer still alive
//   1: destroy the stream and free the pinned buffer first, then reset
//   2: reset, then free the pinned buffer
//   3: as 0, but keep trying for 20 s (a reset each second) before giving up
// Exit status 0 when a kernel ran correctly after the reset.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace {

__global__ void trap_when_told(volatile unsigned* go) {
  if (threadIdx.x == 0) {
    while (*go == 0) {
    }
    __trap();
  }
}

__global__ void store_42(int* p) { *p = 42; }

#define SHOW(x)                                                          \
  do {                                                                   \
    cudaError_t e_ = (x);                                                \
    std::printf("%-58s -> %s\n", #x, cudaGetErrorName(e_));              \
  } while (0)

}  // namespace

int main(int argc, char** argv) {
  const int variant = argc > 1 ? std::atoi(argv[1]) : 0;
  SHOW(cudaSetDevice(0));
  SHOW(cudaFree(nullptr));
  unsigned* host = nullptr;
  unsigned* dev = nullptr;
  SHOW(cudaHostAlloc(reinterpret_cast<void**>(&host), 4096, cudaHostAllocMapped | cudaHostAllocPortable));
  *host = 0;
  SHOW(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), host, 0));
  cudaStream_t stream;
  SHOW(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Calls in flight, as in gpusock: the kernel is running (waiting on host memory) when
  // it traps.
  trap_when_told<<<1, 96, 0, stream>>>(dev);
  SHOW(cudaGetLastError());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  *reinterpret_cast<volatile unsigned*>(host) = 1;
  SHOW(cudaStreamSynchronize(stream));
  if (variant == 1) {
    SHOW(cudaStreamDestroy(stream));
    SHOW(cudaFreeHost(host));
  }
  SHOW(cudaDeviceReset());
  if (variant == 2) SHOW(cudaFreeHost(host));
  const int attempts = variant == 3 ? 20 : 3;
  for (int attempt = 0; attempt < attempts; ++attempt) {
    SHOW(cudaSetDevice(0));
    const cudaError_t e = cudaFree(nullptr);
    std::printf("attempt %d: cudaFree(nullptr) -> %s\n", attempt, cudaGetErrorName(e));
    if (e == cudaSuccess) break;
    SHOW(cudaDeviceReset());
    std::this_thread::sleep_for(std::chrono::milliseconds(variant == 3 ? 1000 : 500));
  }
  int* p = nullptr;
  int v = 0;
  SHOW(cudaMalloc(&p, sizeof(int)));
  store_42<<<1, 1>>>(p);
  SHOW(cudaDeviceSynchronize());
  SHOW(cudaMemcpy(&v, p, sizeof v, cudaMemcpyDeviceToHost));
  std::printf("value %d (want 42): %s\n", v, v == 42 ? "recovered" : "not recovered");
  return v == 42 ? 0 : 1;
}
