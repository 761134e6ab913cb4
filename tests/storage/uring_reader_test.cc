#include "storage/uring_reader.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<uint8_t, FreeDeleter>;

AlignedBuffer Aligned(size_t bytes) {
  const size_t rounded = (bytes + kDirectIoAlignment - 1) / kDirectIoAlignment * kDirectIoAlignment;
  return AlignedBuffer(static_cast<uint8_t*>(std::aligned_alloc(kDirectIoAlignment, rounded)));
}

// A file of `bytes` fresh random bytes.
void WriteRandomFile(const std::string& path, size_t bytes, std::mt19937_64& rng) {
  std::vector<uint8_t> data(bytes);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(bytes));
}

// The reference: plain pread of [offset, offset + bytes).
std::vector<uint8_t> Pread(const std::string& path, uint64_t offset, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  const int fd = ::open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  size_t done = 0;
  while (done < bytes) {
    const ssize_t n =
        ::pread(fd, out.data() + done, bytes - done, static_cast<off_t>(offset + done));
    EXPECT_GT(n, 0);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return out;
}

// A batch of random reads inside [0, file_bytes), with the buffers they land in. Aligned ops have
// 4096-aligned offsets, lengths and buffers; the others are aligned only by chance. Each op's
// destination is split into 1..5 iovecs.
struct Batch {
  std::vector<ReadOp> ops;
  std::vector<AlignedBuffer> buffers;  // one per op
  std::vector<size_t> lengths;         // one per op
};

Batch RandomBatch(std::mt19937_64& rng, uint64_t file_bytes, size_t n, bool aligned) {
  constexpr uint64_t kA = kDirectIoAlignment;
  Batch b;
  for (size_t i = 0; i < n; ++i) {
    uint64_t offset, len;
    if (aligned) {
      const uint64_t blocks = file_bytes / kA;
      offset = rng() % blocks * kA;
      len = (1 + rng() % std::min<uint64_t>(64, blocks - offset / kA)) * kA;
    } else {
      offset = rng() % (file_bytes - 1);
      len = 1 + rng() % std::min<uint64_t>(300000, file_bytes - offset);
    }
    const size_t shift = aligned ? 0 : 1 + rng() % 4095;  // misalign the buffer on purpose
    AlignedBuffer buf = Aligned(len + shift + kA);
    ReadOp op;
    op.offset = offset;
    uint64_t at = 0;
    const int parts = 1 + static_cast<int>(rng() % 5);
    for (int p = 0; p < parts && at < len; ++p) {
      uint64_t take = p + 1 == parts ? len - at : (rng() % (len - at + 1));
      if (aligned) take = take / kA * kA;
      if (p + 1 == parts) take = len - at;
      if (take == 0) continue;
      op.iov.push_back({buf.get() + shift + at, take});
      at += take;
    }
    b.ops.push_back(std::move(op));
    b.buffers.push_back(std::move(buf));
    b.lengths.push_back(len);
  }
  return b;
}

void ExpectMatchesPread(const std::string& path, const Batch& b) {
  for (size_t i = 0; i < b.ops.size(); ++i) {
    const std::vector<uint8_t> want = Pread(path, b.ops[i].offset, b.lengths[i]);
    size_t at = 0;
    for (const auto& [dst, len] : b.ops[i].iov) {
      ASSERT_EQ(std::memcmp(dst, want.data() + at, len), 0)
          << "op " << i << " offset " << b.ops[i].offset << " iov at " << at;
      at += len;
    }
    ASSERT_EQ(at, b.lengths[i]);
  }
}

struct Mode {
  bool direct;
  bool uring;
};

class BatchReaderModes : public ::testing::TestWithParam<Mode> {};

TEST_P(BatchReaderModes, RandomRunsMatchPread) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string path = dir.file("data");
  const uint64_t file_bytes = (8u << 20) + 12345;  // not a whole number of blocks
  WriteRandomFile(path, file_bytes, rng);
  BatchReaderOptions options;
  options.direct = GetParam().direct;
  options.use_io_uring = GetParam().uring;
  std::unique_ptr<BatchReader> reader;
  ASSERT_TRUE(BatchReader::Open(path, options, &reader).ok());
  EXPECT_EQ(reader->direct_available(), GetParam().direct);  // ext4 takes O_DIRECT

  // Aligned only: every byte goes direct when the reader is direct.
  Batch aligned = RandomBatch(rng, file_bytes, 100, /*aligned=*/true);
  ReadCallStats call;
  ASSERT_TRUE(reader->Read(aligned.ops, &call).ok());
  ExpectMatchesPread(path, aligned);
  uint64_t want_bytes = 0;
  for (size_t len : aligned.lengths) want_bytes += len;
  EXPECT_EQ(call.bytes, want_bytes);
  EXPECT_EQ(call.direct_bytes, GetParam().direct ? want_bytes : 0);

  // Unaligned: buffered.
  Batch unaligned = RandomBatch(rng, file_bytes, 100, /*aligned=*/false);
  ASSERT_TRUE(reader->Read(unaligned.ops, &call).ok());
  ExpectMatchesPread(path, unaligned);
  EXPECT_EQ(call.direct_bytes, 0u);

  // Mixed, in one call, more ops than the queue depth.
  Batch mixed = RandomBatch(rng, file_bytes, 150, true);
  Batch more = RandomBatch(rng, file_bytes, 150, false);
  for (size_t i = 0; i < more.ops.size(); ++i) {
    mixed.ops.push_back(std::move(more.ops[i]));
    mixed.buffers.push_back(std::move(more.buffers[i]));
    mixed.lengths.push_back(more.lengths[i]);
  }
  ASSERT_TRUE(reader->Read(mixed.ops).ok());
  ExpectMatchesPread(path, mixed);

  const BatchReaderCounters c = reader->counters();
  EXPECT_EQ(c.reads, 3u);
  EXPECT_EQ(c.ops, 500u);
  EXPECT_EQ(c.buffered_ops, GetParam().direct ? 250u : 500u);
  EXPECT_EQ(c.sync_fallback_reads, GetParam().uring ? 0u : 3u);
  EXPECT_EQ(c.errors, 0u);
  uint64_t in_histogram = 0;
  for (uint64_t n : c.latency_us_log2) in_histogram += n;
  EXPECT_EQ(in_histogram, 3u);
  EXPECT_GT(c.LatencyQuantileMicros(0.5), 0u);
}

INSTANTIATE_TEST_SUITE_P(All, BatchReaderModes,
                         ::testing::Values(Mode{true, true}, Mode{false, true}, Mode{true, false},
                                           Mode{false, false}),
                         [](const auto& info) {
                           return std::string(info.param.direct ? "Direct" : "Buffered") +
                                  (info.param.uring ? "Uring" : "Preadv");
                         });

TEST(BatchReader, OpLongerThanIovMaxIsSplit) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string path = dir.file("data");
  constexpr size_t kPages = 2500, kPage = 4096;
  WriteRandomFile(path, kPages * kPage + 100, rng);
  std::unique_ptr<BatchReader> reader;
  ASSERT_TRUE(BatchReader::Open(path, true, &reader).ok());
  AlignedBuffer buf = Aligned(kPages * kPage);
  ReadOp op;
  op.offset = 0;
  // Scattered destinations: every page to a shuffled slot.
  std::vector<size_t> slot(kPages);
  for (size_t i = 0; i < kPages; ++i) slot[i] = i;
  std::shuffle(slot.begin(), slot.end(), rng);
  for (size_t i = 0; i < kPages; ++i) op.iov.push_back({buf.get() + slot[i] * kPage, kPage});
  ReadCallStats call;
  ASSERT_TRUE(reader->Read({op}, &call).ok());
  EXPECT_EQ(call.direct_bytes, kPages * kPage);
  const std::vector<uint8_t> want = Pread(path, 0, kPages * kPage);
  for (size_t i = 0; i < kPages; ++i) {
    ASSERT_EQ(std::memcmp(buf.get() + slot[i] * kPage, want.data() + i * kPage, kPage), 0) << i;
  }
}

TEST(BatchReader, ConcurrentThreadsShareOneReader) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string path = dir.file("data");
  const uint64_t file_bytes = 4u << 20;
  WriteRandomFile(path, file_bytes, rng);
  const std::vector<uint8_t> whole = Pread(path, 0, file_bytes);
  std::unique_ptr<BatchReader> reader;
  ASSERT_TRUE(BatchReader::Open(path, true, &reader).ok());
  constexpr int kThreads = 8, kReads = 40, kOps = 20;
  std::vector<uint64_t> seeds(kThreads);
  for (auto& s : seeds) s = rng();
  std::vector<int> bad(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 local(seeds[t]);
      for (int r = 0; r < kReads; ++r) {
        Batch b = RandomBatch(local, file_bytes, kOps, (r + t) % 2 == 0);
        if (!reader->Read(b.ops).ok()) {
          ++bad[t];
          continue;
        }
        for (size_t i = 0; i < b.ops.size(); ++i) {
          size_t at = 0;
          for (const auto& [dst, len] : b.ops[i].iov) {
            if (std::memcmp(dst, whole.data() + b.ops[i].offset + at, len) != 0) ++bad[t];
            at += len;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
  const BatchReaderCounters c = reader->counters();
  EXPECT_EQ(c.reads, uint64_t{kThreads} * kReads);
  EXPECT_EQ(c.ops, uint64_t{kThreads} * kReads * kOps);
  EXPECT_GT(c.direct_bytes, 0u);
}

TEST(BatchReader, MissingFileIsNotFound) {
  testing::ScratchDir dir;
  std::unique_ptr<BatchReader> reader;
  const std::string path = dir.file("nope");
  Status s = BatchReader::Open(path, true, &reader);
  EXPECT_TRUE(s.IsNotFound()) << s.ToString();
  EXPECT_NE(s.message().find(path), std::string::npos) << s.ToString();
  EXPECT_EQ(reader, nullptr);
}

TEST(BatchReader, PastEndOfFileIsCorruption) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string path = dir.file("data");
  const uint64_t file_bytes = 10 * 4096 + 1000;
  WriteRandomFile(path, file_bytes, rng);
  for (bool uring : {true, false}) {
    BatchReaderOptions options;
    options.use_io_uring = uring;
    std::unique_ptr<BatchReader> reader;
    ASSERT_TRUE(BatchReader::Open(path, options, &reader).ok());
    AlignedBuffer buf = Aligned(4 * 4096);
    // Aligned (direct) read straddling the end: a short direct read, then EOF on the rest.
    ReadOp straddle{9 * 4096, {{buf.get(), 2 * 4096}}};
    Status s = reader->Read({straddle});
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find(path), std::string::npos) << s.ToString();
    EXPECT_NE(s.message().find("offset " + std::to_string(file_bytes)), std::string::npos)
        << s.ToString();
    // The bytes before the end did arrive.
    EXPECT_EQ(std::memcmp(buf.get(), Pread(path, 9 * 4096, 5096).data(), 5096), 0);
    // Wholly past the end, in a batch with good reads around it.
    ReadOp good1{0, {{buf.get(), 4096}}};
    ReadOp past{file_bytes + 4096 * 3, {{buf.get() + 4096, 100}}};
    ReadOp good2{4096, {{buf.get() + 2 * 4096, 4096}}};
    s = reader->Read({good1, past, good2});
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_EQ(reader->counters().errors, 2u);
    // The reader is still good afterwards.
    EXPECT_TRUE(reader->Read({good1, good2}).ok());
  }
}

TEST(BatchReader, NullDestinationIsInvalidArgument) {
  testing::ScratchDir dir;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string path = dir.file("data");
  WriteRandomFile(path, 8192, rng);
  std::unique_ptr<BatchReader> reader;
  ASSERT_TRUE(BatchReader::Open(path, false, &reader).ok());
  ReadOp op{0, {{nullptr, 10}}};
  EXPECT_TRUE(reader->Read({op}).IsInvalidArgument());
  // Empty batches and empty ops are fine.
  EXPECT_TRUE(reader->Read({}).ok());
  EXPECT_TRUE(reader->Read({ReadOp{0, {}}}).ok());
}

// A direct read refused with EINVAL after O_DIRECT was accepted at open (injected: the scratch
// filesystem takes direct reads) is read again buffered, and the reader stays buffered after.
TEST(BatchReader, RefusedDirectReadIsReadAgainBuffered) {
  for (bool uring : {true, false}) {
    SCOPED_TRACE(uring ? "io_uring" : "preadv");
    testing::ScratchDir dir;
    std::mt19937_64 rng(testing::FreshSeed());
    const std::string path = dir.file("data");
    constexpr uint64_t kFileBytes = 64 * 4096;
    WriteRandomFile(path, kFileBytes, rng);
    BatchReaderOptions options;
    options.use_io_uring = uring;
    options.fail_first_direct_read_for_testing = true;
    std::unique_ptr<BatchReader> reader;
    ASSERT_TRUE(BatchReader::Open(path, options, &reader).ok());
    if (!reader->direct_available()) GTEST_SKIP() << "the scratch filesystem refuses O_DIRECT";
    Batch b = RandomBatch(rng, kFileBytes, 30, /*aligned=*/true);
    for (size_t i = 0; i < b.ops.size(); ++i) std::memset(b.buffers[i].get(), 0xa5, b.lengths[i]);
    ReadCallStats call;
    Status s = reader->Read(b.ops, &call);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectMatchesPread(path, b);
    EXPECT_FALSE(reader->direct_available());
    EXPECT_LT(call.direct_bytes, call.bytes);  // the refused piece, at least, went buffered
    EXPECT_GE(reader->counters().resubmits, 1u);
    EXPECT_EQ(reader->counters().errors, 0u);
    Batch later = RandomBatch(rng, kFileBytes, 10, /*aligned=*/true);
    s = reader->Read(later.ops, &call);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectMatchesPread(path, later);
    EXPECT_EQ(call.direct_bytes, 0u);
  }
}

TEST(BatchReader, DirectRefusedFallsBackToBuffered) {
  // tmpfs refuses O_DIRECT on older kernels (newer ones take it); either way the reader works.
  const std::string shm = "/dev/shm";
  if (::access(shm.c_str(), W_OK) != 0) GTEST_SKIP() << "no writable /dev/shm";
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string path = shm + "/sqkv-uring-test-" + std::to_string(rng());
  WriteRandomFile(path, 64 * 4096, rng);
  std::unique_ptr<BatchReader> reader;
  Status s = BatchReader::Open(path, true, &reader);
  ASSERT_TRUE(s.ok()) << s.ToString();
  Batch b = RandomBatch(rng, 64 * 4096, 30, true);
  ReadCallStats call;
  s = reader->Read(b.ops, &call);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectMatchesPread(path, b);
  if (!reader->direct_available()) {
    EXPECT_EQ(call.direct_bytes, 0u);
  }
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace sqkv
