#include "storage/npy.h"

#include "storage/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <new>
#include <optional>
#include <string_view>

#include "common/dtype.h"

namespace sqkv {
namespace {

static_assert(std::endian::native == std::endian::little,
              "'<' and '=' descrs are read without byte swaps; a big-endian host would need them");

constexpr std::string_view kMagic = "\x93NUMPY";
constexpr size_t kVersionBytes = 2;           // major, minor
constexpr size_t kDataAlignment = 64;         // the writer starts the data on this boundary
constexpr size_t kMaxV1HeaderBytes = 0xffff;  // the v1 header length is a u16
constexpr size_t kMaxPreambleBytes = 12;      // magic, version, a 4-byte header length
// Longest header read (numpy writes a few hundred bytes and by default reads at most 10000).
constexpr size_t kMaxHeaderBytes = size_t{1} << 20;
// Staging buffer for the float16/float64 conversion; a multiple of every element size.
constexpr size_t kReadChunkBytes = size_t{1} << 20;

// Header length field width by major version: 2 bytes in v1, 4 in v2 and v3.
size_t LengthFieldBytes(int major) { return major == 1 ? 2 : 4; }

// A Python tuple, as numpy writes it: "()", "(5,)", "(2, 3)".
std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

// Elements of `shape`; nullopt if a dim is negative or the product overflows `limit`.
std::optional<uint64_t> CheckedCount(const std::vector<int64_t>& shape, uint64_t limit) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n) || n > limit) {
      return std::nullopt;
    }
  }
  return n;
}

// The three header fields, before they are checked against what this reader supports.
struct NpyHeader {
  std::optional<std::string> descr;
  std::optional<bool> fortran_order;
  std::optional<std::vector<int64_t>> shape;
};

// A recursive-descent parser for the header dict, e.g.
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// Accepts either quote style, any whitespace, keys in any order and an optional trailing comma;
// rejects unknown, missing or repeated keys and anything after the closing brace.
class HeaderParser {
 public:
  explicit HeaderParser(std::string_view text) : text_(text) {}

  Status Parse(NpyHeader* out) {
    SQKV_RETURN_IF_ERROR(Expect('{'));
    while (true) {
      SkipSpace();
      if (Peek() == '}') break;
      std::string key;
      SQKV_RETURN_IF_ERROR(ParseString(&key));
      SQKV_RETURN_IF_ERROR(Expect(':'));
      SQKV_RETURN_IF_ERROR(ParseEntry(key, out));
      SkipSpace();
      if (Peek() != ',') break;
      ++pos_;
    }
    SQKV_RETURN_IF_ERROR(Expect('}'));
    SkipSpace();
    if (pos_ != text_.size()) return Error("unexpected text after the closing brace");
    if (!out->descr || !out->fortran_order || !out->shape) {
      return Status::InvalidArgument("header dict lacks one of 'descr', 'fortran_order', 'shape'");
    }
    return Status::Ok();
  }

 private:
  Status ParseEntry(const std::string& key, NpyHeader* out) {
    SkipSpace();
    if (key == "descr") {
      if (out->descr) return Error("repeated key 'descr'");
      if (Peek() == '[') return Error("structured dtypes are not supported");
      std::string descr;
      SQKV_RETURN_IF_ERROR(ParseString(&descr));
      out->descr = std::move(descr);
      return Status::Ok();
    }
    if (key == "fortran_order") {
      if (out->fortran_order) return Error("repeated key 'fortran_order'");
      for (bool value : {false, true}) {
        const std::string_view word = value ? "True" : "False";
        if (text_.substr(pos_, word.size()) == word) {
          pos_ += word.size();
          out->fortran_order = value;
          return Status::Ok();
        }
      }
      return Error("fortran_order is not True or False");
    }
    if (key == "shape") {
      if (out->shape) return Error("repeated key 'shape'");
      std::vector<int64_t> shape;
      SQKV_RETURN_IF_ERROR(ParseShape(&shape));
      out->shape = std::move(shape);
      return Status::Ok();
    }
    return Error("unknown key '" + key + "'");
  }

  // "()", "(5,)", "(2, 3)", "(2, 3,)". "(5)" is an int in Python, not a tuple, and is rejected.
  Status ParseShape(std::vector<int64_t>* shape) {
    SQKV_RETURN_IF_ERROR(Expect('('));
    bool trailing_comma = false;
    while (true) {
      SkipSpace();
      if (Peek() == ')') break;
      int64_t dim = 0;
      SQKV_RETURN_IF_ERROR(ParseDim(&dim));
      shape->push_back(dim);
      SkipSpace();
      trailing_comma = Peek() == ',';
      if (!trailing_comma) break;
      ++pos_;
    }
    SQKV_RETURN_IF_ERROR(Expect(')'));
    if (shape->size() == 1 && !trailing_comma) return Error("shape of one dim lacks its comma");
    return Status::Ok();
  }

  Status ParseDim(int64_t* dim) {
    if (Peek() == '-') return Error("negative shape dim");
    const size_t begin = pos_;
    uint64_t v = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const auto digit = static_cast<uint64_t>(text_[pos_] - '0');
      if (__builtin_mul_overflow(v, uint64_t{10}, &v) || __builtin_add_overflow(v, digit, &v) ||
          v > static_cast<uint64_t>(INT64_MAX)) {
        return Error("shape dim too large");
      }
      ++pos_;
    }
    if (pos_ == begin) return Error("shape dim is not an integer");
    *dim = static_cast<int64_t>(v);
    return Status::Ok();
  }

  // A quoted string without escapes (no header field needs them).
  Status ParseString(std::string* out) {
    SkipSpace();
    const char quote = Peek();
    if (quote != '\'' && quote != '"') return Error("expected a quoted string");
    const size_t end = text_.find(quote, pos_ + 1);
    if (end == std::string_view::npos) return Error("unterminated string");
    std::string_view s = text_.substr(pos_ + 1, end - pos_ - 1);
    if (s.find('\\') != std::string_view::npos)
      return Error("escapes in strings are not supported");
    *out = std::string(s);
    pos_ = end + 1;
    return Status::Ok();
  }

  Status Expect(char c) {
    SkipSpace();
    if (Peek() != c) return Error(std::string("expected '") + c + "'");
    ++pos_;
    return Status::Ok();
  }

  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }
  char Peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  Status Error(const std::string& what) const {
    return Status::InvalidArgument("malformed header dict at byte " + std::to_string(pos_) + ": " +
                                   what);
  }

  std::string_view text_;
  size_t pos_ = 0;
};

// The element size of a supported float descr, or an error naming it.
Result<size_t> FloatDescrSize(const std::string& descr) {
  if (descr.size() == 3 && descr[0] == '>' && descr[1] == 'f') {
    return Status::InvalidArgument("big-endian descr '" + descr + "' is not supported");
  }
  for (size_t size : {2, 4, 8}) {
    for (char order : {'<', '=', '|'}) {
      if (descr == std::string{order, 'f', static_cast<char>('0' + size)}) return size;
    }
  }
  return Status::InvalidArgument("descr '" + descr +
                                 "' is not a little-endian float16, float32 or float64 array");
}

// src: n elements of `size` bytes, little-endian floats; dst: n floats.
void ConvertToFloat(const uint8_t* src, size_t size, size_t n, float* dst) {
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = src + i * size;  // unaligned: copy each element out
    if (size == 2) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      dst[i] = HalfToFloat(h);
    } else if (size == 4) {
      std::memcpy(&dst[i], p, 4);
    } else {
      double d;
      std::memcpy(&d, p, 8);
      dst[i] = static_cast<float>(d);  // IEEE: nearest float; overflow gives +-inf
    }
  }
}

// Reads exactly `n` bytes at `offset`. The file's size was checked before, so an early end means
// it shrank while being read.
Status PreadExact(int fd, void* buf, size_t n, uint64_t offset) {
  size_t got = 0;
  SQKV_RETURN_IF_ERROR(PreadFull(fd, offset, n, buf, /*path=*/"", &got));  // the caller names it
  if (got < n) {
    return Status::IOError("the file ended at byte " + std::to_string(offset + got) +
                           " while being read (did it change?)");
  }
  return Status::Ok();
}

// Reads `count` elements of `size` bytes from `offset` into `out`, converted to float. The data
// lands in `out` directly (float32) or through a bounded staging buffer (float16, float64).
Status ReadData(int fd, uint64_t offset, size_t size, uint64_t count, std::vector<float>* out) {
  try {
    out->resize(count);
  } catch (const std::bad_alloc&) {
    return Status::Unavailable("cannot allocate memory for " + std::to_string(count) +
                               " float32 elements");
  }
  if (size == sizeof(float)) return PreadExact(fd, out->data(), count * size, offset);
  const uint64_t chunk_elems = kReadChunkBytes / size;
  std::vector<uint8_t> chunk(static_cast<size_t>(std::min(count, chunk_elems)) * size);
  for (uint64_t first = 0; first < count; first += chunk_elems) {
    const size_t n = static_cast<size_t>(std::min(count - first, chunk_elems));
    SQKV_RETURN_IF_ERROR(PreadExact(fd, chunk.data(), n * size, offset + first * size));
    ConvertToFloat(chunk.data(), size, n, out->data() + first);
  }
  return Status::Ok();
}

// `fd`: an open .npy file of `file_size` bytes. The preamble and header are read and checked, and
// the data's size matched against the file's, before anything sized by the file is allocated.
// Errors carry no file name; the caller adds it.
Result<NpyArray> ReadNpy(int fd, uint64_t file_size) {
  const size_t min_preamble = kMagic.size() + kVersionBytes + LengthFieldBytes(1);
  if (file_size < min_preamble) {
    return Status::InvalidArgument("file is " + std::to_string(file_size) +
                                   " bytes, too short for a .npy preamble");
  }
  char preamble_bytes[kMaxPreambleBytes];
  const size_t have = static_cast<size_t>(std::min<uint64_t>(file_size, sizeof(preamble_bytes)));
  SQKV_RETURN_IF_ERROR(PreadExact(fd, preamble_bytes, have, 0));
  const std::string_view bytes(preamble_bytes, have);
  if (bytes.substr(0, kMagic.size()) != kMagic) {
    return Status::InvalidArgument("not a .npy file (bad magic)");
  }
  const int major = static_cast<uint8_t>(bytes[kMagic.size()]);
  const int minor = static_cast<uint8_t>(bytes[kMagic.size() + 1]);
  if (major < 1 || major > 3 || minor != 0) {
    return Status::InvalidArgument("unsupported .npy version " + std::to_string(major) + "." +
                                   std::to_string(minor));
  }
  const size_t len_bytes = LengthFieldBytes(major);
  const size_t preamble = kMagic.size() + kVersionBytes + len_bytes;
  if (file_size < preamble) return Status::InvalidArgument("file ends inside the preamble");
  uint32_t header_len = 0;
  std::memcpy(&header_len, bytes.data() + preamble - len_bytes, len_bytes);  // LE host
  if (header_len > file_size - preamble) {
    return Status::InvalidArgument("header length " + std::to_string(header_len) +
                                   " runs past the end of the file (" + std::to_string(file_size) +
                                   " bytes)");
  }
  if (header_len > kMaxHeaderBytes) {
    return Status::InvalidArgument("header length " + std::to_string(header_len) +
                                   " exceeds the limit of " + std::to_string(kMaxHeaderBytes) +
                                   " bytes");
  }
  std::string header_text(header_len, '\0');
  SQKV_RETURN_IF_ERROR(PreadExact(fd, header_text.data(), header_len, preamble));
  NpyHeader header;
  SQKV_RETURN_IF_ERROR(HeaderParser(header_text).Parse(&header));

  NpyArray array;
  array.source_dtype = *header.descr;
  array.shape = *header.shape;
  SQKV_ASSIGN_OR_RETURN(const size_t size, FloatDescrSize(array.source_dtype));
  if (*header.fortran_order) {
    return Status::InvalidArgument("fortran_order True is not supported (C order only)");
  }
  const uint64_t data_offset = preamble + header_len;
  const uint64_t data_bytes = file_size - data_offset;
  const std::optional<uint64_t> count = CheckedCount(array.shape, UINT64_MAX / size);
  if (!count) {
    return Status::InvalidArgument("shape " + ShapeString(array.shape) + " has too many elements");
  }
  const uint64_t need = *count * size;
  if (need > data_bytes) {
    return Status::InvalidArgument("truncated: shape " + ShapeString(array.shape) + " of '" +
                                   array.source_dtype + "' needs " + std::to_string(need) +
                                   " data bytes but the file holds " + std::to_string(data_bytes));
  }
  if (need < data_bytes) {
    return Status::InvalidArgument(std::to_string(data_bytes - need) +
                                   " unexpected bytes after the data of shape " +
                                   ShapeString(array.shape));
  }
  SQKV_RETURN_IF_ERROR(ReadData(fd, data_offset, size, *count, &array.data));
  return array;
}

// data: (product(shape)) elements of `size` bytes, little-endian, described by `descr`.
Status WriteArray(const std::string& path, const std::string& descr, size_t size, const void* data,
                  const std::vector<int64_t>& shape) {
  const std::optional<uint64_t> count = CheckedCount(shape, SIZE_MAX / size);
  if (!count) {
    return Status::InvalidArgument(path + ": shape " + ShapeString(shape) +
                                   " has a negative dim or too many elements");
  }
  if (data == nullptr && *count > 0) return Status::InvalidArgument(path + ": data is null");
  std::string header =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + ShapeString(shape) + ", }";

  constexpr int kMajor = 1;
  const size_t preamble = kMagic.size() + kVersionBytes + LengthFieldBytes(kMajor);
  // Spaces, then the closing '\n', bring the data to the alignment.
  header.append((kDataAlignment - (preamble + header.size() + 1) % kDataAlignment) % kDataAlignment,
                ' ');
  header += '\n';
  if (header.size() > kMaxV1HeaderBytes) {  // thousands of dims; numpy itself stops at 64
    return Status::InvalidArgument(path + ": a shape of " + std::to_string(shape.size()) +
                                   " dims does not fit a .npy v1.0 header");
  }
  const auto header_len = static_cast<uint16_t>(header.size());

  std::string preamble_bytes(kMagic);
  preamble_bytes += static_cast<char>(kMajor);
  preamble_bytes += '\0';                                                                 // minor
  preamble_bytes.append(reinterpret_cast<const char*>(&header_len), sizeof(header_len));  // LE
  const std::string_view payload(static_cast<const char*>(data), data ? *count * size : 0);
  return WriteFileAtomically(path, {preamble_bytes, header, payload});
}

}  // namespace

Result<NpyArray> ReadNpyAsFloat(const std::string& path) {
  int fd = -1;
  uint64_t size = 0;
  SQKV_RETURN_IF_ERROR(OpenRegularFile(path, &fd, &size));
  Result<NpyArray> array = ReadNpy(fd, size);
  ::close(fd);
  if (!array.ok()) return array.status().WithContext(path);
  return array;
}

Status WriteNpy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  return WriteArray(path, "<f4", sizeof(float), data, shape);
}

Status WriteNpyInt32(const std::string& path, const int32_t* data,
                     const std::vector<int64_t>& shape) {
  return WriteArray(path, "<i4", sizeof(int32_t), data, shape);
}

}  // namespace sqkv
