// Runtime: the public face of Core, and device selection.
#include "gpusock/hostcall/runtime.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core.hpp"

namespace gpusock {

std::string Status::to_string() const {
  if (ok()) return "ok";
  return std::string(std::strerror(code_)) + ": " + message_;
}

const char* to_string(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kCuda: return "cuda";
    case DeviceKind::kCpu: return "cpu";
    default: return "auto";
  }
}

DeviceKind detect_device() {
  if (const char* env = std::getenv("GPUSOCK_DEVICE")) {
    if (std::strcmp(env, "cpu") == 0) return DeviceKind::kCpu;
    if (std::strcmp(env, "cuda") == 0) return DeviceKind::kCuda;
  }
  return cuda_available() ? DeviceKind::kCuda : DeviceKind::kCpu;
}

Result<std::unique_ptr<Runtime>> Runtime::create(const RuntimeOptions& options) {
  auto core = internal::Core::create(options);
  if (!core.ok()) return core.status();
  return std::unique_ptr<Runtime>(new Runtime(std::move(core.value())));
}

Runtime::Runtime(std::shared_ptr<internal::Core> core) : core_(std::move(core)) {}
Runtime::~Runtime() { core_->shutdown(); }

DeviceKind Runtime::device() const { return core_->device().kind(); }
std::string Runtime::device_name() const { return core_->device().name(); }
Status Runtime::health() const { return core_->health(); }
Status Runtime::register_handler(uint32_t opcode, std::string name, hostcall::Handler handler) {
  if (core_->failed()) return core_->health();
  return core_->register_handler(opcode, std::move(name), std::move(handler), false);
}
RuntimeStats Runtime::stats() const { return core_->stats(); }
Status Runtime::register_descriptor_write(hostcall::Handler handler) {
  return core_->register_handler(hostcall::op::kDescriptorWrite, "descriptor-write", std::move(handler), true);
}
Status Runtime::set_service_hook(std::shared_ptr<hostcall::ServiceHook> hook) {
  if (core_->failed()) return core_->health();
  return core_->set_service_hook(std::move(hook));
}
void Runtime::shutdown() { core_->shutdown(); }
bool Runtime::is_shut_down() const { return core_->is_shut_down(); }
uint8_t* Runtime::staging_host() const { return core_->staging_host(); }
uint64_t Runtime::staging_size() const { return core_->staging_size(); }
uint32_t Runtime::slot_count() const { return core_->slot_count(); }
uint32_t Runtime::max_resident_warps() const { return core_->device().max_resident_warps(); }
Result<void*> Runtime::device_alloc(size_t bytes) {
  if (core_->failed()) return core_->health();
  void* p = nullptr;
  const size_t n = bytes == 0 ? 1 : bytes;
  Status s = core_->device().alloc_device(n, &p);
  if (!s.ok()) return s;
  core_->note_allocation(p, n);
  return p;
}
Status Runtime::device_free(void* ptr) {
  if (ptr == nullptr) return {};
  Status s = core_->forget_allocation(ptr);
  if (s.ok()) core_->device().free_device(ptr);
  return s;
}
Result<Runtime::Mapped> Runtime::mapped_alloc(size_t bytes) {
  if (core_->failed()) return core_->health();
  Mapped m;
  Status s = core_->device().alloc_mapped(bytes == 0 ? 1 : bytes, &m.host, &m.device);
  if (!s.ok()) return s;
  return m;
}
void Runtime::mapped_free(void* host) {
  if (host != nullptr) core_->device().free_mapped(host);
}
void Runtime::mapped_free_at_exit(void* host) {
  if (host != nullptr) core_->adopt_mapped(host);
}
void Runtime::device_free_at_exit(void* device) {
  if (device != nullptr) core_->adopt_device(device);
}
Status Runtime::set_module_state(uint32_t index, void* device_ptr, const void* head, size_t head_bytes) {
  return core_->set_module_state(index, device_ptr, head, head_bytes);
}
uint32_t Runtime::service_threads() const { return core_->options().service_threads; }
Status Runtime::copy_to_device(void* dst, const void* src, size_t bytes) {
  if (core_->failed()) return core_->health();
  return core_->device().copy_to_device(dst, src, bytes);
}
Status Runtime::deliver(void* dst, const void* src, size_t bytes) { return core_->deliver(dst, src, bytes, true); }
Status Runtime::start_delivery(void* dst, const void* src, size_t bytes, uint64_t* ticket) {
  return core_->deliver(dst, src, bytes, false, ticket);
}
Status Runtime::finish_deliveries(uint64_t ticket) { return core_->finish_deliveries(ticket); }
bool Runtime::deliveries_done(uint64_t ticket) { return core_->deliveries_done(ticket); }
Status Runtime::start_fetch(void* dst, const void* src, size_t bytes, uint64_t* ticket) {
  return core_->fetch(dst, src, bytes, ticket);
}
bool Runtime::is_device_memory(const void* p, size_t bytes) const { return core_->inside_allocation(p, bytes); }
Status Runtime::register_device_memory(void* p, size_t bytes) { return core_->register_range(p, bytes); }
Status Runtime::unregister_device_memory(void* p) { return core_->unregister_range(p); }
Status Runtime::copy_from_device(void* dst, const void* src, size_t bytes) {
  if (core_->failed()) return core_->health();
  return core_->device().copy_from_device(dst, src, bytes);
}
const hostcall::DeviceContext* Runtime::device_context() const { return core_->device_context(); }

}  // namespace gpusock
