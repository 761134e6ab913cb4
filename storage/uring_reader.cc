#include "storage/uring_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>

#include "storage/file_util.h"

namespace sqkv {
namespace {

// Reads in flight per Read() call (and entries of each thread's ring).
constexpr unsigned kQueueDepth = 64;
// Most iovecs one readv takes (IOV_MAX on Linux); longer ops are split.
constexpr size_t kMaxIovPerRead = 1024;

bool IsAligned(uint64_t v) { return v % kDirectIoAlignment == 0; }

// The calling thread's ring, created on first use. SINGLE_ISSUER and DEFER_TASKRUN fit a ring
// that only its own thread touches; kernels without them get a plain ring.
class ThreadRing {
 public:
  ~ThreadRing() {
    if (ready_) io_uring_queue_exit(&ring_);
  }
  // The ring, or null when io_uring cannot be used on this thread.
  io_uring* Get() {
    if (!tried_) Init();
    return ready_ ? &ring_ : nullptr;
  }
  // After a failure that leaves the ring in an unknown state: stop using it on this thread.
  void Abandon() {
    if (ready_) io_uring_queue_exit(&ring_);
    ready_ = false;
  }

 private:
  void Init() {
    tried_ = true;
    int rc = io_uring_queue_init(kQueueDepth, &ring_,
                                 IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
    if (rc == -EINVAL) rc = io_uring_queue_init(kQueueDepth, &ring_, 0);
    if (rc == 0) {
      ready_ = true;
      return;
    }
    static std::atomic<bool> logged{false};
    if (!logged.exchange(true)) {
      std::fprintf(stderr,
                   "sqkv: io_uring unavailable (io_uring_queue_init: %s); disk reads fall back "
                   "to preadv\n",
                   std::strerror(-rc));
    }
  }
  io_uring ring_{};
  bool tried_ = false;
  bool ready_ = false;
};

thread_local ThreadRing t_ring;

// One contiguous piece of an op (at most kMaxIovPerRead iovecs), continued after short reads.
struct ReadPiece {
  bool direct = false;
  uint64_t offset = 0;     // where the remaining bytes start in the file
  uint64_t remaining = 0;  // bytes still to read
  size_t first_iov = 0;    // iov[first_iov...] are still (partly) unread
  std::vector<iovec> iov;
};

}  // namespace

// The state of one Read() call: splits ops into pieces, runs them through a ring or preadv and
// keeps the first error.
class BatchReadRun {
 public:
  explicit BatchReadRun(BatchReader* reader) : reader_(reader) {}

  Status Prepare(const std::vector<ReadOp>& ops) {
    const bool direct = reader_->direct_available();
    for (const ReadOp& op : ops) {
      uint64_t total = 0;
      bool aligned = IsAligned(op.offset);
      for (const auto& [dst, len] : op.iov) {
        if (len == 0) continue;
        if (dst == nullptr) {
          return Status::InvalidArgument("read " + reader_->path_ + " at offset " +
                                         std::to_string(op.offset) + ": null destination");
        }
        aligned = aligned && IsAligned(reinterpret_cast<uintptr_t>(dst)) && IsAligned(len);
        total += len;
      }
      if (total == 0) continue;
      ++ops_;
      if (!(direct && aligned)) ++buffered_ops_;
      uint64_t offset = op.offset;
      ReadPiece* piece = nullptr;
      for (const auto& [dst, len] : op.iov) {
        if (len == 0) continue;
        if (piece == nullptr || piece->iov.size() == kMaxIovPerRead) {
          if (piece != nullptr) offset += piece->remaining;
          piece = &pieces_.emplace_back();
          piece->direct = direct && aligned;
          piece->offset = offset;
        }
        piece->iov.push_back({dst, len});
        piece->remaining += len;
      }
    }
    return Status::Ok();
  }

  // Runs every piece through the ring.
  void RunRing(io_uring* ring) {
    for (size_t i = 0; i < pieces_.size(); ++i) todo_.push_back(i);
    unsigned queued = 0;     // prepared in the SQ, not yet taken by the kernel
    unsigned in_flight = 0;  // taken by the kernel, completion not yet seen
    while (true) {
      while (status_.ok() && !todo_.empty() && queued + in_flight < kQueueDepth) {
        io_uring_sqe* sqe = io_uring_get_sqe(ring);
        if (sqe == nullptr) break;
        const size_t i = todo_.front();
        todo_.pop_front();
        ReadPiece& p = pieces_[i];
        io_uring_prep_readv(sqe, FdOf(p), p.iov.data() + p.first_iov,
                            static_cast<unsigned>(p.iov.size() - p.first_iov), p.offset);
        io_uring_sqe_set_data64(sqe, i);
        ++queued;
      }
      if (queued + in_flight == 0) break;
      const int rc = io_uring_submit_and_wait(ring, 1);
      if (rc >= 0) {
        queued -= static_cast<unsigned>(rc);
        in_flight += static_cast<unsigned>(rc);
      } else if (rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
        // The ring refused work it should take. Collect what is in flight (the caller's buffers
        // must be quiet when we return), then drop the ring so the queued entries never run.
        Fail(
            Status::IOError("read " + reader_->path_ + ": io_uring submit: " + std::strerror(-rc)));
        while (in_flight > 0) {
          io_uring_cqe* cqe = nullptr;
          if (io_uring_wait_cqe(ring, &cqe) != 0) break;
          io_uring_cqe_seen(ring, cqe);
          --in_flight;
        }
        t_ring.Abandon();
        return;
      }
      io_uring_cqe* cqe = nullptr;
      while (in_flight > 0 && io_uring_peek_cqe(ring, &cqe) == 0) {
        const size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
        const int res = cqe->res;
        io_uring_cqe_seen(ring, cqe);
        --in_flight;
        if (Complete(i, res)) todo_.push_back(i);
      }
    }
  }

  void RunSync() {
    for (size_t i = 0; i < pieces_.size() && status_.ok(); ++i) {
      ReadPiece& p = pieces_[i];
      while (p.remaining > 0 && status_.ok()) {
        const ssize_t n =
            ::preadv(FdOf(p), p.iov.data() + p.first_iov,
                     static_cast<int>(p.iov.size() - p.first_iov), static_cast<off_t>(p.offset));
        Complete(i, n < 0 ? -errno : static_cast<int>(n));
      }
    }
  }

  const Status& status() const { return status_; }
  uint64_t bytes() const { return bytes_; }
  uint64_t direct_bytes() const { return direct_bytes_; }
  uint64_t ops() const { return ops_; }
  uint64_t buffered_ops() const { return buffered_ops_; }
  uint64_t resubmits() const { return resubmits_; }

 private:
  int FdOf(const ReadPiece& p) const { return p.direct ? reader_->direct_fd_ : reader_->fd_; }

  void Fail(Status s) {
    if (status_.ok()) status_ = std::move(s);
  }

  // Accounts for a result `res` (bytes, or -errno) of piece i; true when it must run again.
  bool Complete(size_t i, int res) {
    ReadPiece& p = pieces_[i];
    if (p.direct && reader_->options_.fail_first_direct_read_for_testing &&
        !reader_->fault_injected_.exchange(true)) {
      res = -EINVAL;  // whatever arrived is read again, buffered
    }
    if (res < 0) {
      if (res == -EINTR || res == -EAGAIN) {
        ++resubmits_;
        return true;
      }
      if (res == -EINVAL && p.direct) {
        // The filesystem accepted O_DIRECT at open but refuses this read: stay buffered from now.
        if (!reader_->direct_refused_.exchange(true)) {
          std::fprintf(stderr, "sqkv: %s refuses direct reads (EINVAL); reading it buffered\n",
                       reader_->path_.c_str());
        }
        p.direct = false;
        ++resubmits_;
        return true;
      }
      Fail(Status::IOError("read " + reader_->path_ + " at offset " + std::to_string(p.offset) +
                           " (" + std::to_string(p.remaining) + " bytes): " + std::strerror(-res)));
      return false;
    }
    if (res == 0) {
      Fail(Status::Corruption("read " + reader_->path_ + " at offset " + std::to_string(p.offset) +
                              " (" + std::to_string(p.remaining) +
                              " bytes): the file ends at byte " + std::to_string(p.offset)));
      return false;
    }
    uint64_t n = static_cast<uint64_t>(res);
    bytes_ += n;
    if (p.direct) direct_bytes_ += n;
    p.offset += n;
    p.remaining -= n;
    if (p.remaining == 0) return false;
    // Short read (end of file, or a read larger than the kernel does at once): skip what
    // arrived and continue buffered, since the rest need not be aligned any more.
    while (n > 0) {
      iovec& v = p.iov[p.first_iov];
      const uint64_t take = std::min<uint64_t>(n, v.iov_len);
      v.iov_base = static_cast<uint8_t*>(v.iov_base) + take;
      v.iov_len -= take;
      n -= take;
      if (v.iov_len == 0) ++p.first_iov;
    }
    p.direct = false;
    ++resubmits_;
    return status_.ok();
  }

  BatchReader* reader_;
  std::vector<ReadPiece> pieces_;
  std::deque<size_t> todo_;
  Status status_;
  uint64_t bytes_ = 0, direct_bytes_ = 0, ops_ = 0, buffered_ops_ = 0, resubmits_ = 0;
};

uint64_t BatchReaderCounters::LatencyQuantileMicros(double q) const {
  uint64_t total = 0;
  for (uint64_t c : latency_us_log2) total += c;
  if (total == 0) return 0;
  const double target = std::clamp(q, 0.0, 1.0) * static_cast<double>(total);
  uint64_t seen = 0;
  for (int b = 0; b < kReadLatencyBuckets; ++b) {
    seen += latency_us_log2[b];
    if (static_cast<double>(seen) >= target && seen > 0) return uint64_t{2} << b;
  }
  return uint64_t{2} << (kReadLatencyBuckets - 1);
}

Status BatchReader::Open(const std::string& path, const BatchReaderOptions& options,
                         std::unique_ptr<BatchReader>* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open", path, errno);
  int direct_fd = -1;
  if (options.direct) {
    direct_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    int err = direct_fd < 0 ? errno : 0;
    if (direct_fd >= 0) {
      // Some filesystems take the flag at open and refuse the reads; probe one block.
      void* probe = std::aligned_alloc(kDirectIoAlignment, kDirectIoAlignment);
      if (probe != nullptr && ::pread(direct_fd, probe, kDirectIoAlignment, 0) < 0) err = errno;
      std::free(probe);
      if (err == EINVAL) {
        ::close(direct_fd);
        direct_fd = -1;
      }
    }
    // EINVAL (tmpfs and friends) means no direct I/O: the reader reads buffered. Other errors
    // are real.
    if (err != 0 && err != EINVAL) {
      if (direct_fd >= 0) ::close(direct_fd);
      ::close(fd);
      return ErrnoStatus("open (O_DIRECT)", path, err);
    }
  }
  out->reset(new BatchReader(path, options, fd, direct_fd));
  return Status::Ok();
}

BatchReader::~BatchReader() {
  ::close(fd_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
}

Status BatchReader::Read(const std::vector<ReadOp>& ops, ReadCallStats* call) {
  const auto started = std::chrono::steady_clock::now();
  BatchReadRun run(this);
  Status s = run.Prepare(ops);
  bool sync = false;
  if (s.ok()) {
    io_uring* ring = options_.use_io_uring ? t_ring.Get() : nullptr;
    sync = ring == nullptr;
    if (sync) {
      run.RunSync();
    } else {
      run.RunRing(ring);
    }
    s = run.status();
  }
  ReadCallStats stats;
  stats.bytes = run.bytes();
  stats.direct_bytes = run.direct_bytes();
  stats.micros = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                           std::chrono::steady_clock::now() - started)
                                           .count());
  Record(stats, run.ops(), run.buffered_ops(), run.resubmits(), sync, !s.ok());
  if (call != nullptr) *call = stats;
  return s;
}

void BatchReader::Record(const ReadCallStats& call, uint64_t ops, uint64_t buffered_ops,
                         uint64_t resubmits, bool sync_fallback, bool failed) {
  constexpr auto kRelaxed = std::memory_order_relaxed;
  reads_.fetch_add(1, kRelaxed);
  ops_.fetch_add(ops, kRelaxed);
  bytes_.fetch_add(call.bytes, kRelaxed);
  direct_bytes_.fetch_add(call.direct_bytes, kRelaxed);
  buffered_ops_.fetch_add(buffered_ops, kRelaxed);
  resubmits_.fetch_add(resubmits, kRelaxed);
  if (sync_fallback) sync_fallback_reads_.fetch_add(1, kRelaxed);
  if (failed) errors_.fetch_add(1, kRelaxed);
  const int bucket = call.micros == 0 ? 0
                                      : std::min(static_cast<int>(std::bit_width(call.micros)) - 1,
                                                 kReadLatencyBuckets - 1);
  latency_us_log2_[bucket].fetch_add(1, kRelaxed);
}

BatchReaderCounters BatchReader::counters() const {
  constexpr auto kRelaxed = std::memory_order_relaxed;
  BatchReaderCounters c;
  c.reads = reads_.load(kRelaxed);
  c.ops = ops_.load(kRelaxed);
  c.bytes = bytes_.load(kRelaxed);
  c.direct_bytes = direct_bytes_.load(kRelaxed);
  c.buffered_ops = buffered_ops_.load(kRelaxed);
  c.resubmits = resubmits_.load(kRelaxed);
  c.sync_fallback_reads = sync_fallback_reads_.load(kRelaxed);
  c.errors = errors_.load(kRelaxed);
  for (int b = 0; b < kReadLatencyBuckets; ++b)
    c.latency_us_log2[b] = latency_us_log2_[b].load(kRelaxed);
  return c;
}

}  // namespace sqkv
