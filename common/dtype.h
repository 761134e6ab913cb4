// Element types of stored keys and values, and conversions between them and float32 on the host.
// Plain C++: included by .cu files too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace sqkv {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// Bytes of one page: K then V, page_tokens rows of head_dim elements each.
inline constexpr size_t PageBytes(int page_tokens, int head_dim, DType dtype) {
  return 2ull * static_cast<size_t>(page_tokens) * static_cast<size_t>(head_dim) * DTypeSize(dtype);
}

// "f32", "f16", "bf16".
const char* DTypeName(DType t);
// Accepts our names and the safetensors/numpy spellings ("F32", "F16", "BF16", "float32", ...).
std::optional<DType> ParseDType(std::string_view s);

// Scalar conversions. f16 is IEEE binary16; bf16 is the top half of a binary32. Narrowing rounds
// to nearest even; NaN stays NaN, overflow becomes infinity.
float HalfToFloat(uint16_t h);
uint16_t FloatToHalf(float f);
inline float Bf16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
uint16_t FloatToBf16(float f);

// src: n elements of `t`; dst: n floats.
void ToFloat(DType t, const void* src, float* dst, size_t n);
// src: n floats; dst: n elements of `t`.
void FromFloat(DType t, const float* src, void* dst, size_t n);

}  // namespace sqkv
