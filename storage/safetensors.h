// Reading and writing safetensors files (https://github.com/huggingface/safetensors):
//
//   [8 bytes]  N, the header length, unsigned little-endian
//   [N bytes]  a UTF-8 JSON object: tensor name -> {"dtype", "shape", "data_offsets"}, plus an
//              optional "__metadata__" object of string -> string
//   [rest]     the data section; tensor bytes are little-endian, C order, at
//              [data_offsets[0], data_offsets[1]) relative to the start of this section
//
// Only the element types SqueezeKV stores are accepted: F32, F16 and BF16. Every file is treated
// as untrusted: Open() checks every field and answers InvalidArgument naming the file and the
// tensor at fault; it never asserts or crashes on malformed bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"

namespace sqkv {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // every dim >= 0; empty for a scalar
  // Byte range [data_begin, data_end) relative to the start of the data section.
  uint64_t data_begin = 0;
  uint64_t data_end = 0;

  // Product of `shape` (1 for a scalar). Open() guarantees it does not overflow.
  size_t num_elements() const;
  // num_elements() * DTypeSize(dtype) == data_end - data_begin for every opened tensor.
  size_t nbytes() const;
};

// A read-only safetensors file, open for positional reads (pread) as long as the object lives.
// Open() reads and checks the header; tensor bytes are read only when asked for, into the
// caller's buffer, so memory stays bounded by what the caller holds. If another process shrinks
// the file after Open (truncates it in place), a read past the new end is IOError naming the
// file, the tensor and the offset, never a signal. A file replaced by rename keeps being read
// from the one that was opened.
class SafetensorsFile {
 public:
  // Opens and validates `path`. NotFound if it does not exist, IOError if the OS refuses,
  // InvalidArgument if the bytes are not a well-formed safetensors file with supported dtypes:
  //   - shorter than 8 bytes, or a header length past the end of the file or above 32 MiB;
  //   - a header that is not a JSON object (bad UTF-8, trailing garbage, duplicate keys);
  //   - a tensor name over 1,024 bytes;
  //   - an entry that is not an object with exactly "dtype", "shape" and "data_offsets";
  //   - a dtype other than F32/F16/BF16; a dim that is not a non-negative integer; over 64 dims;
  //   - data_offsets that are not 2 non-decreasing integers, that hold a byte count other than
  //     num_elements * element size, that end past the data section, or that overlap another
  //     tensor's bytes;
  //   - "__metadata__" that is not an object of string -> string.
  // Gaps between tensors and unused bytes at the end of the data section are allowed.
  static Result<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // All tensors, sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The tensor called `name`, or nullptr.
  const TensorInfo* Find(std::string_view name) const;
  // Copies `info`'s data into dst: info.nbytes() bytes, little-endian, C order (dst needs no
  // alignment). `info` must come from this file. IOError naming the file, the tensor and the file
  // offset if the OS refuses the read or the file ends before the tensor does (it shrank after
  // Open); dst's contents are then unspecified.
  Status Read(const TensorInfo& info, void* dst) const;
  // As Read, converted to float: dst receives info.num_elements() floats (ToFloat). F16 and BF16
  // go through a staging buffer of at most 1 MiB.
  Status ReadFloat(const TensorInfo& info, float* dst) const;
  // The "__metadata__" entries (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;

  // Reads bytes [offset, offset + nbytes) of `info`'s data into dst.
  Status ReadRange(const TensorInfo& info, uint64_t offset, size_t nbytes, void* dst) const;

  std::string path_;
  int fd_ = -1;                // read-only, closed by the destructor
  uint64_t file_bytes_ = 0;    // the size when opened
  uint64_t data_section_ = 0;  // file offset of the data section, just after the header
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Builds a safetensors file in memory and writes it in one go.
class SafetensorsWriter {
 public:
  // Queues a tensor. `data` holds product(shape) elements of `dtype`, C order, little-endian; it
  // is copied here, so the caller may free it as soon as Add returns. Problems (duplicate or
  // reserved names, negative dims) are reported by Write, not here.
  void Add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data);
  // As above, with the caller's size of `data` in bytes; Write fails unless it equals
  // product(shape) * DTypeSize(dtype). Only `nbytes` bytes are read from `data`.
  void Add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data,
           size_t nbytes);
  // Replaces the "__metadata__" entries (none by default: then no "__metadata__" key is written).
  void SetMetadata(std::map<std::string, std::string> metadata);

  // Writes the file atomically: a temporary file in the same directory, fsync, then rename over
  // `path`. Layout: the JSON header padded with spaces to a multiple of 8 bytes, then the tensors'
  // bytes contiguously in the order they were added. InvalidArgument for duplicate, empty or
  // reserved ("__metadata__") names, negative dims, a size that does not match the shape, or
  // names/metadata that are not valid UTF-8; IOError if the OS refuses. On error `path` is left
  // as it was.
  Status Write(const std::string& path) const;

 private:
  struct Pending {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;  // a copy of the caller's data; empty if it passed nullptr
    size_t declared_nbytes;      // what the caller said `data` holds
  };
  std::vector<Pending> pending_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace sqkv
