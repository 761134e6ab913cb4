// Segment files: one per context version, holding every page of every (layer, kv head).
//
// Layout:  [header: 4096 bytes][page 0][page 1]...    (pages start 4096-aligned, for direct I/O)
// Page order: layer-major, then kv head, then the head's pages in storage (cluster) order. Where
// a (layer, head)'s pages start is recorded in the catalog, with a checksum per page.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <functional>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/status.h"
#include "storage/uring_reader.h"

namespace sqkv {

inline constexpr size_t kSegmentHeaderBytes = 4096;

struct SegmentHeader {
  uint64_t version = 0;  // context version that owns the file
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t tokens = 0;
  uint32_t head_dim = 0;
  uint32_t page_tokens = 0;
  DType dtype = DType::kBF16;
  uint64_t page_bytes = 0;  // PageBytes(page_tokens, head_dim, dtype)
  uint64_t num_pages = 0;   // set by SegmentWriter::Finish
};

// Writes a segment to `<path>.tmp`, published at `path` by Finish (fsync + rename + dir fsync).
// A writer destroyed before Finish removes its temporary file.
class SegmentWriter {
 public:
  static Status Create(const std::string& path, const SegmentHeader& header,
                       std::unique_ptr<SegmentWriter>* out);
  ~SegmentWriter();

  // Appends pages in order. data: (num_pages, page_bytes); checksums: (num_pages), written out.
  Status AppendPages(const void* data, size_t num_pages, uint64_t* checksums);
  uint64_t pages_written() const { return header_.num_pages; }
  Status Finish();

 private:
  SegmentWriter(std::string path, const SegmentHeader& header, int fd);
  Status Flush();
  std::string path_;
  SegmentHeader header_;
  int fd_ = -1;
  bool finished_ = false;
  std::string buffer_;  // pending bytes, written in large chunks
};

class SegmentReader {
 public:
  static Status Open(const std::string& path, std::unique_ptr<SegmentReader>* out);
  ~SegmentReader();
  const SegmentHeader& header() const { return header_; }
  const std::string& path() const { return path_; }

  // Reads pages [first, first + count) into dst: (count, page_bytes). With `expected` (count
  // checksums) each page is checked; a mismatch is Corruption naming the page.
  Status ReadPages(uint64_t first, uint64_t count, void* dst, const uint64_t* expected) const;

  // A run of consecutive pages and where each goes (page_bytes each; 4096-aligned destinations
  // and page sizes let the read bypass the kernel page cache with O_DIRECT).
  struct Run {
    uint64_t first_page = 0;
    std::vector<void*> dst;  // (count)
  };
  // Reads every run in one batched submission (io_uring) and checks each page against
  // expected(page). bytes_read/direct_bytes (may be null) receive what was read.
  Status ReadRuns(const std::vector<Run>& runs, const std::function<uint64_t(uint64_t)>& expected,
                  uint64_t* bytes_read, uint64_t* direct_bytes) const;

 private:
  SegmentReader(std::string path, const SegmentHeader& header, int fd,
                std::unique_ptr<BatchReader> batch);
  std::string path_;
  SegmentHeader header_;
  int fd_ = -1;
  std::unique_ptr<BatchReader> batch_;  // direct, batched reads of page runs
};

// Encodes/decodes the 4096-byte header (magic, format version, fields, checksum).
void EncodeSegmentHeader(const SegmentHeader& h, uint8_t* out /*(kSegmentHeaderBytes)*/);
Status DecodeSegmentHeader(const uint8_t* in /*(kSegmentHeaderBytes)*/, SegmentHeader* h);

}  // namespace sqkv
