#include "storage/segment.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

#include "storage/file_util.h"

namespace sqkv {
namespace {

constexpr char kMagic[8] = {'S', 'Q', 'K', 'V', 'S', 'E', 'G', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kWriteChunk = 8u << 20;  // flush the write buffer at 8 MiB

// Page dims a header may have: far above any import's, and small enough that PageBytes cannot
// wrap 64 bits.
constexpr uint32_t kMaxPageDim = 1u << 20;

// Whether the header's page size is that of its page shape (the reader and writer both check).
bool PageSizeMatchesShape(const SegmentHeader& h) {
  return h.page_tokens > 0 && h.head_dim > 0 && h.page_tokens <= kMaxPageDim &&
         h.head_dim <= kMaxPageDim &&
         h.page_bytes ==
             PageBytes(static_cast<int>(h.page_tokens), static_cast<int>(h.head_dim), h.dtype);
}

// The file size the header implies; nullopt when it does not fit 64 bits.
std::optional<uint64_t> ExpectedFileSize(const SegmentHeader& h) {
  uint64_t pages_bytes = 0, total = 0;
  if (__builtin_mul_overflow(h.num_pages, h.page_bytes, &pages_bytes) ||
      __builtin_add_overflow(pages_bytes, uint64_t{kSegmentHeaderBytes}, &total)) {
    return std::nullopt;
  }
  return total;
}

// Field offsets inside the header block.
struct Writer {
  uint8_t* p;
  template <typename T>
  void Put(const T& v) {
    std::memcpy(p, &v, sizeof(T));
    p += sizeof(T);
  }
};
struct Reader {
  const uint8_t* p;
  template <typename T>
  T Get() {
    T v;
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
};

Status PwriteAll(int fd, const void* data, size_t bytes, uint64_t offset, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (bytes > 0) {
    ssize_t n = ::pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus("write", path, errno);
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// PreadFull, with an early end of the file as Corruption: its size was checked against the header.
Status PreadAll(int fd, void* data, size_t bytes, uint64_t offset, const std::string& path) {
  size_t got = 0;
  SQKV_RETURN_IF_ERROR(PreadFull(fd, offset, bytes, data, path, &got));
  if (got < bytes) {
    return Status::Corruption("segment " + path + " is shorter than its header says");
  }
  return Status::Ok();
}

}  // namespace

void EncodeSegmentHeader(const SegmentHeader& h, uint8_t* out) {
  std::memset(out, 0, kSegmentHeaderBytes);
  std::memcpy(out, kMagic, sizeof(kMagic));
  Writer w{out + sizeof(kMagic)};
  w.Put(kFormatVersion);
  w.Put(h.version);
  w.Put(h.layers);
  w.Put(h.kv_heads);
  w.Put(h.tokens);
  w.Put(h.head_dim);
  w.Put(h.page_tokens);
  w.Put(static_cast<uint32_t>(h.dtype));
  w.Put(h.page_bytes);
  w.Put(h.num_pages);
  const uint64_t sum = Checksum64(out, kSegmentHeaderBytes - 8);
  std::memcpy(out + kSegmentHeaderBytes - 8, &sum, 8);
}

Status DecodeSegmentHeader(const uint8_t* in, SegmentHeader* h) {
  if (std::memcmp(in, kMagic, sizeof(kMagic)) != 0) {
    return Status::Corruption("not a segment file (bad magic)");
  }
  uint64_t stored;
  std::memcpy(&stored, in + kSegmentHeaderBytes - 8, 8);
  if (stored != Checksum64(in, kSegmentHeaderBytes - 8)) {
    return Status::Corruption("segment header checksum mismatch");
  }
  Reader r{in + sizeof(kMagic)};
  const uint32_t format = r.Get<uint32_t>();
  if (format != kFormatVersion) {
    return Status::Corruption("segment format version " + std::to_string(format) + " unknown");
  }
  h->version = r.Get<uint64_t>();
  h->layers = r.Get<uint32_t>();
  h->kv_heads = r.Get<uint32_t>();
  h->tokens = r.Get<uint32_t>();
  h->head_dim = r.Get<uint32_t>();
  h->page_tokens = r.Get<uint32_t>();
  const uint32_t dtype = r.Get<uint32_t>();
  if (dtype > static_cast<uint32_t>(DType::kBF16)) return Status::Corruption("segment dtype");
  h->dtype = static_cast<DType>(dtype);
  h->page_bytes = r.Get<uint64_t>();
  h->num_pages = r.Get<uint64_t>();
  // A checksummed header can still be wrong (written by another tool, or damaged before its
  // checksum was taken): everything sized by page_bytes trusts it.
  if (!PageSizeMatchesShape(*h)) {
    return Status::Corruption("segment header: page_bytes " + std::to_string(h->page_bytes) +
                              " does not match page_tokens " + std::to_string(h->page_tokens) +
                              ", head_dim " + std::to_string(h->head_dim) + " and " +
                              DTypeName(h->dtype));
  }
  return Status::Ok();
}

// ---- SegmentWriter ----------------------------------------------------------------------------

SegmentWriter::SegmentWriter(std::string path, const SegmentHeader& header, int fd)
    : path_(std::move(path)), header_(header), fd_(fd) {
  header_.num_pages = 0;
}

Status SegmentWriter::Create(const std::string& path, const SegmentHeader& header,
                             std::unique_ptr<SegmentWriter>* out) {
  if (!PageSizeMatchesShape(header)) {
    return Status::InvalidArgument("segment page_bytes " + std::to_string(header.page_bytes) +
                                   " does not match its page shape");
  }
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus("create", tmp, errno);
  out->reset(new SegmentWriter(path, header, fd));
  return Status::Ok();
}

SegmentWriter::~SegmentWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) RemoveFile(path_ + ".tmp").PermitUncheckedError();
}

Status SegmentWriter::AppendPages(const void* data, size_t num_pages, uint64_t* checksums) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < num_pages; ++i) {
    checksums[i] = Checksum64(p + i * header_.page_bytes, header_.page_bytes);
  }
  buffer_.append(reinterpret_cast<const char*>(p), num_pages * header_.page_bytes);
  header_.num_pages += num_pages;
  if (buffer_.size() >= kWriteChunk) return Flush();
  return Status::Ok();
}

Status SegmentWriter::Flush() {
  if (buffer_.empty()) return Status::Ok();
  const uint64_t end = kSegmentHeaderBytes + header_.num_pages * header_.page_bytes;
  SQKV_RETURN_IF_ERROR(PwriteAll(fd_, buffer_.data(), buffer_.size(), end - buffer_.size(),
                                 path_ + ".tmp"));
  buffer_.clear();
  return Status::Ok();
}

Status SegmentWriter::Finish() {
  const std::string tmp = path_ + ".tmp";
  SQKV_RETURN_IF_ERROR(Flush());
  std::vector<uint8_t> block(kSegmentHeaderBytes);
  EncodeSegmentHeader(header_, block.data());
  SQKV_RETURN_IF_ERROR(PwriteAll(fd_, block.data(), block.size(), 0, tmp));
  if (::fsync(fd_) != 0) return ErrnoStatus("fsync", tmp, errno);
  ::close(fd_);
  fd_ = -1;
  SQKV_RETURN_IF_ERROR(RenameDurable(tmp, path_));
  finished_ = true;
  return Status::Ok();
}

// ---- SegmentReader ----------------------------------------------------------------------------

Status SegmentReader::Open(const std::string& path, std::unique_ptr<SegmentReader>* out) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open segment", path, errno);
  std::vector<uint8_t> block(kSegmentHeaderBytes);
  SegmentHeader h;
  Status s = PreadAll(fd, block.data(), block.size(), 0, path);
  if (s.ok()) s = DecodeSegmentHeader(block.data(), &h);
  if (s.ok()) {
    auto size = FileSize(path);
    const std::optional<uint64_t> expected = ExpectedFileSize(h);
    if (!size.ok()) {
      s = size.status();
    } else if (!expected) {
      s = Status::Corruption("segment " + path + ": header says " + std::to_string(h.num_pages) +
                             " pages of " + std::to_string(h.page_bytes) +
                             " bytes, more than a file can hold");
    } else if (*size != *expected) {
      s = Status::Corruption("segment " + path + " has " + std::to_string(*size) +
                             " bytes, header says " + std::to_string(*expected));
    }
  }
  if (!s.ok()) {
    ::close(fd);
    return s.WithContext("segment " + path);
  }
  std::unique_ptr<BatchReader> batch;
  if (Status bs = BatchReader::Open(path, /*direct=*/true, &batch); !bs.ok()) {
    ::close(fd);
    return bs.WithContext("segment " + path);
  }
  out->reset(new SegmentReader(path, h, fd, std::move(batch)));
  return Status::Ok();
}

SegmentReader::SegmentReader(std::string path, const SegmentHeader& header, int fd,
                             std::unique_ptr<BatchReader> batch)
    : path_(std::move(path)), header_(header), fd_(fd), batch_(std::move(batch)) {}

Status SegmentReader::ReadRuns(const std::vector<Run>& runs,
                               const std::function<uint64_t(uint64_t)>& expected,
                               uint64_t* bytes_read, uint64_t* direct_bytes) const {
  std::vector<ReadOp> ops;
  ops.reserve(runs.size());
  for (const Run& run : runs) {
    if (run.first_page + run.dst.size() > header_.num_pages) {
      return Status::Corruption("segment " + path_ + ": pages past its end requested");
    }
    ReadOp op;
    op.offset = kSegmentHeaderBytes + run.first_page * header_.page_bytes;
    for (void* d : run.dst) op.iov.emplace_back(d, header_.page_bytes);
    ops.push_back(std::move(op));
  }
  ReadCallStats call;
  SQKV_RETURN_IF_ERROR(batch_->Read(ops, &call));
  if (bytes_read) *bytes_read = call.bytes;
  if (direct_bytes) *direct_bytes = call.direct_bytes;
  for (const Run& run : runs) {
    for (size_t i = 0; i < run.dst.size(); ++i) {
      const uint64_t page = run.first_page + i;
      if (Checksum64(run.dst[i], header_.page_bytes) != expected(page)) {
        return Status::Corruption("segment " + path_ + ": page " + std::to_string(page) +
                                  " checksum mismatch");
      }
    }
  }
  return Status::Ok();
}

SegmentReader::~SegmentReader() {
  if (fd_ >= 0) ::close(fd_);
}

Status SegmentReader::ReadPages(uint64_t first, uint64_t count, void* dst,
                                const uint64_t* expected) const {
  if (first + count > header_.num_pages) {
    return Status::Corruption("segment " + path_ + ": pages [" + std::to_string(first) + ", " +
                              std::to_string(first + count) + ") past its " +
                              std::to_string(header_.num_pages) + " pages");
  }
  SQKV_RETURN_IF_ERROR(PreadAll(fd_, dst, count * header_.page_bytes,
                                kSegmentHeaderBytes + first * header_.page_bytes, path_));
  if (expected == nullptr) return Status::Ok();
  const auto* p = static_cast<const uint8_t*>(dst);
  for (uint64_t i = 0; i < count; ++i) {
    if (Checksum64(p + i * header_.page_bytes, header_.page_bytes) != expected[i]) {
      return Status::Corruption("segment " + path_ + ": page " + std::to_string(first + i) +
                                " checksum mismatch");
    }
  }
  return Status::Ok();
}

}  // namespace sqkv
