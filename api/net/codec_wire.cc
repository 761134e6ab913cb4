// Small readers and enum conversions shared by the codec files.
#include "api/net/codec_wire.h"

#include <cstring>
#include <limits>

namespace sqkv::net::wire_io {

Status ReadText(capnp::Text::Reader t, size_t max_bytes, const char* field, std::string* out) {
  if (t.size() > max_bytes) {
    return Status::InvalidArgument(std::string(field) + " is longer than " +
                                   std::to_string(max_bytes) + " bytes");
  }
  out->assign(t.begin(), t.size());
  return Status::Ok();
}

// data: n float32 little-endian → out.
Status ReadFloats(capnp::Data::Reader data, uint64_t expected, const char* field,
                  std::vector<float>* out) {
  if (data.size() != expected * sizeof(float)) {
    return Status::InvalidArgument(std::string(field) + " holds " + std::to_string(data.size()) +
                                   " bytes, its shape needs " +
                                   std::to_string(expected * sizeof(float)));
  }
  out->resize(expected);
  if (expected > 0) std::memcpy(out->data(), data.begin(), data.size());
  return Status::Ok();
}

void WriteFloats(const std::vector<float>& v, capnp::Data::Builder data) {
  if (!v.empty()) std::memcpy(data.begin(), v.data(), v.size() * sizeof(float));
}

// ---- enums ----

wire::Device ToWire(Device d) {
  switch (d) {
    case Device::kAuto:
      return wire::Device::AUTO;
    case Device::kCpu:
      return wire::Device::CPU;
    case Device::kGpu:
      return wire::Device::GPU;
  }
  return wire::Device::AUTO;
}

Status FromWire(wire::Device d, Device* out) {
  switch (d) {
    case wire::Device::AUTO:
      *out = Device::kAuto;
      return Status::Ok();
    case wire::Device::CPU:
      *out = Device::kCpu;
      return Status::Ok();
    case wire::Device::GPU:
      *out = Device::kGpu;
      return Status::Ok();
  }
  return Status::InvalidArgument("unknown device " + std::to_string(static_cast<int>(d)));
}

wire::Tier ToWire(Tier t) { return t == Tier::kDevice ? wire::Tier::DEVICE : wire::Tier::HOST; }

Status FromWire(wire::Tier t, Tier* out) {
  switch (t) {
    case wire::Tier::HOST:
      *out = Tier::kHost;
      return Status::Ok();
    case wire::Tier::DEVICE:
      *out = Tier::kDevice;
      return Status::Ok();
  }
  return Status::InvalidArgument("unknown tier " + std::to_string(static_cast<int>(t)));
}

wire::SelectMode ToWire(SelectOptions::Mode m) {
  switch (m) {
    case SelectOptions::Mode::kKeepFraction:
      return wire::SelectMode::KEEP_FRACTION;
    case SelectOptions::Mode::kThreshold:
      return wire::SelectMode::THRESHOLD;
    case SelectOptions::Mode::kDense:
      return wire::SelectMode::DENSE;
  }
  return wire::SelectMode::KEEP_FRACTION;
}

Status FromWire(wire::SelectMode m, SelectOptions::Mode* out) {
  switch (m) {
    case wire::SelectMode::KEEP_FRACTION:
      *out = SelectOptions::Mode::kKeepFraction;
      break;
    case wire::SelectMode::THRESHOLD:
      *out = SelectOptions::Mode::kThreshold;
      break;
    case wire::SelectMode::DENSE:
      *out = SelectOptions::Mode::kDense;
      break;
    default:
      return Status::InvalidArgument("unknown select mode " + std::to_string(static_cast<int>(m)));
  }
  return Status::Ok();
}

wire::StatusCode ToWire(Status::Code c) {
  switch (c) {
    case Status::Code::kOk:
      return wire::StatusCode::OK;
    case Status::Code::kInvalidArgument:
      return wire::StatusCode::INVALID_ARGUMENT;
    case Status::Code::kNotFound:
      return wire::StatusCode::NOT_FOUND;
    case Status::Code::kAlreadyExists:
      return wire::StatusCode::ALREADY_EXISTS;
    case Status::Code::kCorruption:
      return wire::StatusCode::CORRUPTION;
    case Status::Code::kIOError:
      return wire::StatusCode::IO_ERROR;
    case Status::Code::kUnavailable:
      return wire::StatusCode::UNAVAILABLE;
    case Status::Code::kInternal:
      return wire::StatusCode::INTERNAL;
    case Status::Code::kCancelled:
      return wire::StatusCode::CANCELLED;
  }
  return wire::StatusCode::INTERNAL;
}

Status FromWire(wire::StatusCode c, std::string message) {
  switch (c) {
    case wire::StatusCode::OK:
      return Status::Ok();
    case wire::StatusCode::INVALID_ARGUMENT:
      return Status::InvalidArgument(std::move(message));
    case wire::StatusCode::NOT_FOUND:
      return Status::NotFound(std::move(message));
    case wire::StatusCode::ALREADY_EXISTS:
      return Status::AlreadyExists(std::move(message));
    case wire::StatusCode::CORRUPTION:
      return Status::Corruption(std::move(message));
    case wire::StatusCode::IO_ERROR:
      return Status::IOError(std::move(message));
    case wire::StatusCode::UNAVAILABLE:
      return Status::Unavailable(std::move(message));
    case wire::StatusCode::INTERNAL:
      return Status::Internal(std::move(message));
    case wire::StatusCode::CANCELLED:
      return Status::Cancelled(std::move(message));
  }
  // A newer server's code: keep the message, call it internal.
  return Status::Internal(std::move(message));
}

bool ElementCount(int64_t a, int64_t b, int64_t c, uint64_t* out) {
  if (a <= 0 || b <= 0 || c <= 0) return false;
  uint64_t n = 0;
  if (__builtin_mul_overflow(static_cast<uint64_t>(a), static_cast<uint64_t>(b), &n) ||
      __builtin_mul_overflow(n, static_cast<uint64_t>(c), &n) ||
      n > std::numeric_limits<uint64_t>::max() / sizeof(float)) {
    return false;
  }
  *out = n;
  return true;
}

}  // namespace sqkv::net::wire_io
