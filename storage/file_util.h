// Small POSIX helpers that return Status instead of errno. All file access of the store goes
// through these or through SegmentWriter/SegmentReader, so failures carry the path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace sqkv {

// Status for a failed system call: "<what> <path>: <strerror(errno)>".
Status ErrnoStatus(const std::string& what, const std::string& path, int err);

// Creates the directory and its parents when missing, and fsyncs the parent of each directory it
// created so the new entries survive a crash.
Status EnsureDir(const std::string& path);
// Flushes a directory entry (after rename/unlink) to disk.
Status FsyncDir(const std::string& path);
// rename(2), then FsyncDir of the target's directory (and of the source's, when it differs); a bare
// name's directory is ".". Does not fsync the file itself: the caller fsyncs its data before.
// An error after the rename is IOError saying `to` was replaced but may not be durable.
Status RenameDurable(const std::string& from, const std::string& to);
// Removes a file; missing is not an error.
Status RemoveFile(const std::string& path);
// Names (not paths) of the regular files in `dir`.
Status ListFiles(const std::string& dir, std::vector<std::string>* names);
Result<uint64_t> FileSize(const std::string& path);
// Opens `path` read-only and checks it is a regular file; *fd must be closed by the caller.
// NotFound/IOError from the OS ("cannot open <path>: ..."), InvalidArgument for a non-file.
// Never blocks on a FIFO or device: the open is non-blocking until the file is known regular.
Status OpenRegularFile(const std::string& path, int* fd, uint64_t* size);
// pread(2) of `bytes` bytes at `offset` into dst (size `bytes`), retried on EINTR and continued
// after short reads. *got receives the bytes read: fewer than `bytes` only when the file ends
// first, which is not an error here (the caller knows what an early end means). IOError
// "cannot read <path>: ..." if the OS refuses; "cannot read: ..." for an empty `path`, when the
// caller adds the name itself.
Status PreadFull(int fd, uint64_t offset, size_t bytes, void* dst, const std::string& path,
                 size_t* got);
// Bytes of the regular files under `dir`, recursively; 0 for a missing directory.
uint64_t DirectoryBytes(const std::string& dir);

// Writes `parts` one after another to `path` through a temporary file in the same directory:
// fsync, rename, then fsync of the directory, so readers see the old file or the whole new one.
// An error after the rename is IOError saying the file was replaced but may not be durable.
Status WriteFileAtomically(const std::string& path, const std::vector<std::string_view>& parts);

// 64-bit xxh3 of a byte range: the store's checksum.
uint64_t Checksum64(const void* data, size_t bytes);

}  // namespace sqkv
