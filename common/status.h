// Errors are values: every fallible call across a module boundary returns a Status or a
// Result<T>. A Status carries a code and a message that names what failed.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>

namespace sqkv {

class [[nodiscard]] Status {
 public:
  enum class Code {
    kOk = 0,
    kInvalidArgument,  // bad input from the caller: shapes, names, values
    kNotFound,         // unknown context, file or key
    kAlreadyExists,
    kCorruption,   // stored bytes fail a check (checksum, header, invariant)
    kIOError,      // the OS said no
    kUnavailable,  // a resource is absent (e.g. no GPU)
    kInternal,     // a bug or a library failure we did not expect
    kCancelled,    // the caller stopped the call before it finished (nothing was changed)
  };

  Status() = default;
  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) {
    return Status(Code::kInvalidArgument, std::move(m));
  }
  static Status NotFound(std::string m) { return Status(Code::kNotFound, std::move(m)); }
  static Status AlreadyExists(std::string m) { return Status(Code::kAlreadyExists, std::move(m)); }
  static Status Corruption(std::string m) { return Status(Code::kCorruption, std::move(m)); }
  static Status IOError(std::string m) { return Status(Code::kIOError, std::move(m)); }
  static Status Unavailable(std::string m) { return Status(Code::kUnavailable, std::move(m)); }
  static Status Internal(std::string m) { return Status(Code::kInternal, std::move(m)); }
  static Status Cancelled(std::string m) { return Status(Code::kCancelled, std::move(m)); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  bool IsNotFound() const { return code_ == Code::kNotFound; }
  bool IsInvalidArgument() const { return code_ == Code::kInvalidArgument; }
  bool IsCorruption() const { return code_ == Code::kCorruption; }
  bool IsUnavailable() const { return code_ == Code::kUnavailable; }
  bool IsCancelled() const { return code_ == Code::kCancelled; }

  // "InvalidArgument: tensor k.3: shape (2, 8) is not 3-D"
  std::string ToString() const;
  static const char* CodeName(Code c);

  // Returns a copy whose message is prefixed with `context: `.
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }

  // Returns a copy with the same code and `message` instead (e.g. a server naming the client's
  // file where the store named its own copy).
  Status WithMessage(std::string message) const {
    if (ok()) return *this;
    return Status(code_, std::move(message));
  }

  // For the rare call whose failure is harmless; makes the intent visible.
  void PermitUncheckedError() const {}

 private:
  Status(Code c, std::string m) : code_(c), message_(std::move(m)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

// A value or the Status saying why there is none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status)                          // NOLINT
      : status_(status.ok() ? Status::Internal("Result built from an OK status")
                            : std::move(status)) {
    assert(!status.ok() && "Result built from an OK status carries no value");
  }
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace sqkv

#define SQKV_CONCAT_INNER(a, b) a##b
#define SQKV_CONCAT(a, b) SQKV_CONCAT_INNER(a, b)

// Returns early from the enclosing function when `expr` is not OK.
#define SQKV_RETURN_IF_ERROR(expr) \
  do {                             \
    ::sqkv::Status _st = (expr);   \
    if (!_st.ok()) return _st;     \
  } while (0)

// SQKV_ASSIGN_OR_RETURN(auto x, MakeX()); declares x from a Result or returns its Status.
#define SQKV_ASSIGN_OR_RETURN(lhs, rexpr) \
  SQKV_ASSIGN_OR_RETURN_IMPL(SQKV_CONCAT(_res_, __LINE__), lhs, rexpr)
#define SQKV_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                               \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()
