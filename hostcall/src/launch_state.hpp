// Private: what a Launch handle points at. Each device implements how to tell whether
// its kernel has finished.
#pragma once

#include <chrono>
#include <memory>

#include "gpusock/hostcall/status.hpp"

namespace gpusock::internal {

struct LaunchState {
  virtual ~LaunchState() = default;
  // Waits up to `timeout` (forever if negative) for the kernel to finish. Returns true
  // once finished; `status` then holds the kernel's outcome.
  virtual bool wait(std::chrono::nanoseconds timeout) = 0;
  virtual Status status() = 0;
};

}  // namespace gpusock::internal
