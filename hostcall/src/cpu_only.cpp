// Built instead of cuda_device.cu when CUDA is disabled: the cpu device is all there is.
#include <cerrno>

#include "core.hpp"

namespace gpusock {
bool cuda_available() { return false; }
namespace internal {
Result<std::unique_ptr<DeviceBackend>> make_cuda_backend(const RuntimeOptions&) {
  return Status(ENODEV, "this build of gpusock has no CUDA support (configured with GPUSOCK_ENABLE_CUDA=OFF)");
}
}  // namespace internal
}  // namespace gpusock
