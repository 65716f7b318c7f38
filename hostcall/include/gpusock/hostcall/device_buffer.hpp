// gpusock/hostcall/device_buffer.hpp — an owning array in kernel-visible memory.
//
//   auto buf = gpusock::DeviceBuffer<int>::create(*rt, 1024);   // zeroed
//   if (!buf.ok()) return buf.status();
//   launch(*rt, {4}, {256}, Fill{}, buf->data());
//   std::vector<int> host = buf->to_host();
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

#include "gpusock/hostcall/runtime.hpp"
#include "gpusock/hostcall/status.hpp"

namespace gpusock {

template <typename T>
class DeviceBuffer {
 public:
  static Result<DeviceBuffer> create(Runtime& rt, size_t count) {
    auto p = rt.device_alloc(count * sizeof(T));
    if (!p.ok()) return p.status();
    return DeviceBuffer(rt, static_cast<T*>(p.value()), count);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : rt_(o.rt_), ptr_(std::exchange(o.ptr_, nullptr)), n_(o.n_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(rt_, o.rt_);
    std::swap(ptr_, o.ptr_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) rt_->device_free(ptr_);
  }

  T* data() const { return ptr_; }
  size_t size() const { return n_; }
  // Copies the whole buffer to the host (empty on a copy error).
  std::vector<T> to_host() const {
    std::vector<T> v(n_);
    if (!rt_->copy_from_device(v.data(), ptr_, n_ * sizeof(T)).ok()) v.clear();
    return v;
  }
  Status from_host(const std::vector<T>& v) {
    return rt_->copy_to_device(ptr_, v.data(), std::min(v.size(), n_) * sizeof(T));
  }

 private:
  DeviceBuffer(Runtime& rt, T* p, size_t n) : rt_(&rt), ptr_(p), n_(n) {}
  Runtime* rt_;
  T* ptr_;
  size_t n_;
};

}  // namespace gpusock
