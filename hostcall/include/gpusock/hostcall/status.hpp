// gpusock/hostcall/status.hpp — host-side error values: Status (errno + message) and
// Result<T> (a value or a Status). Host APIs return these; they never throw.
//
//   gpusock::Result<std::unique_ptr<gpusock::Runtime>> rt = gpusock::Runtime::create();
//   if (!rt.ok()) { std::fprintf(stderr, "%s\n", rt.status().to_string().c_str()); return 1; }
#pragma once

#include <optional>
#include <string>
#include <utility>

namespace gpusock {

class Status {
 public:
  Status() = default;
  // `code` is a positive errno value; 0 means success.
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status ok_status() { return {}; }

  bool ok() const { return code_ == 0; }
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  // "ok", or "<strerror(code)>: <message>".
  std::string to_string() const;

 private:
  int code_ = 0;
  std::string message_;
};

template <typename T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT: implicit by design

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  T&& value() && { return std::move(*value_); }
  T& operator*() { return *value_; }
  T* operator->() { return &*value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace gpusock
