// Reading and writing NumPy .npy files (format versions 1.0, 2.0 and 3.0):
//
//   "\x93NUMPY", major, minor            8 bytes
//   header length, unsigned LE            2 bytes (v1) or 4 bytes (v2, v3)
//   header                                a Python dict literal with exactly the keys 'descr',
//                                         'fortran_order' and 'shape', padded with spaces and
//                                         ending in '\n' (latin-1 in v1/v2, UTF-8 in v3)
//   data                                  product(shape) elements of 'descr'
//
// Files are treated as untrusted: every check fails with InvalidArgument naming the file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace sqkv {

struct NpyArray {
  std::vector<int64_t> shape;  // every dim >= 0; empty for a 0-d array
  std::vector<float> data;     // (product(shape)), converted to float32, C order
  std::string source_dtype;    // the file's 'descr', e.g. "<f4"
};

// Reads a little-endian floating-point array: descr '<f4', '<f2' (IEEE half) or '<f8' (rounded to
// the nearest float; beyond the float range becomes +-inf), also spelled with '=' (native, which
// is little-endian here) or '|'. Rejects big-endian data, fortran_order True, any other descr
// (ints, complex, objects, structured arrays), a malformed header, and data that is truncated or
// followed by extra bytes, and headers over 1 MiB. The header is checked, and the file's size
// matched against it, before any buffer sized by the file is allocated; the data is then read
// straight into the result. NotFound if the file does not exist, InvalidArgument if it is not a
// regular file (a FIFO is refused without blocking), IOError if it cannot be read or changes
// while being read, Unavailable if the data does not fit in memory.
Result<NpyArray> ReadNpyAsFloat(const std::string& path);

// Writes `data` as a v1.0 '<f4' C-order array, the header padded with spaces so the data starts
// at a multiple of 64 bytes. Atomic: a temporary file in the same directory, fsync, rename.
// InvalidArgument for a negative dim, null data with elements to write, or a shape of thousands of
// dims (too long for a v1.0 header); IOError if the OS refuses.
// data: (product(shape)); shape: every dim >= 0, empty for a 0-d array (one element).
Status WriteNpy(const std::string& path, const float* data, const std::vector<int64_t>& shape);

// As WriteNpy, with descr '<i4'.
// data: (product(shape)).
Status WriteNpyInt32(const std::string& path, const int32_t* data,
                     const std::vector<int64_t>& shape);

}  // namespace sqkv
