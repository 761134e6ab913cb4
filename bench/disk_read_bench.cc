// Disk read benchmark (issue 4): direct-read throughput of BatchReader for large coalesced reads
// (1-4 MiB) and for 8 KiB page reads in batches, side by side with `dd iflag=direct` on the same
// file in the same run.
//
//   disk_read_bench [--file ./disk_read_bench.dat] [--gib 2] [--keep]
//
// The file is written with fresh random bytes, fsynced and dropped from the kernel page cache
// (posix_fadvise DONTNEED) before each measurement; reads are O_DIRECT, so they reach the device.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "storage/uring_reader.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kBlock = sqkv::kDirectIoAlignment;
constexpr uint64_t kWriteChunk = 64 * kMiB;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;
Buffer Aligned(size_t bytes) {
  return Buffer(static_cast<uint8_t*>(std::aligned_alloc(kBlock, bytes)));
}

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

bool Check(const sqkv::Status& s, const char* what) {
  if (s.ok()) return true;
  std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
  return false;
}

// Writes `bytes` of random data, fsyncs, and drops the file from the page cache.
bool WriteFile(const std::string& path, uint64_t bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    return false;
  }
  std::vector<uint64_t> chunk(kWriteChunk / 8);
  std::mt19937_64 rng(std::random_device{}());
  for (uint64_t done = 0; done < bytes; done += kWriteChunk) {
    for (auto& w : chunk) w = rng();
    const size_t n = static_cast<size_t>(std::min(kWriteChunk, bytes - done));
    if (::write(fd, chunk.data(), n) != static_cast<ssize_t>(n)) {
      std::perror("write");
      ::close(fd);
      return false;
    }
  }
  const bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok;
}

void DropFromPageCache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// dd's own figure: bytes and seconds from its last line ("N bytes (...) copied, S s, R MB/s").
double DdMBps(const std::string& path) {
  DropFromPageCache(path);
  const std::string cmd = "dd if='" + path + "' of=/dev/null bs=4M iflag=direct 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return 0;
  char line[512];
  double mbps = 0;
  while (std::fgets(line, sizeof(line), p) != nullptr) {
    unsigned long long bytes = 0;
    const char* copied = std::strstr(line, "copied, ");
    if (std::sscanf(line, "%llu bytes", &bytes) == 1 && copied != nullptr) {
      const double secs = std::atof(copied + std::strlen("copied, "));
      if (secs > 0) mbps = static_cast<double>(bytes) / secs / 1e6;
    }
  }
  ::pclose(p);
  return mbps;
}

struct Figure {
  double mbps = 0;
  double ops_per_s = 0;
  uint64_t p50_us = 0, p99_us = 0;  // per Read() call, log2-bucket upper bounds
  double direct_share = 0;
};

// Reads `total` bytes in Read() calls of `batch` ops, each op from `next_op(rng)`: (offset, len).
template <typename NextOp>
Figure Measure(const std::string& path, uint64_t total, size_t batch, size_t max_op,
               NextOp next_op) {
  DropFromPageCache(path);
  std::unique_ptr<sqkv::BatchReader> reader;
  if (!Check(sqkv::BatchReader::Open(path, true, &reader), "open")) std::exit(1);
  Buffer buf = Aligned(batch * max_op);
  std::mt19937_64 rng(42);
  uint64_t done = 0, ops = 0;
  const auto started = Clock::now();
  std::vector<sqkv::ReadOp> batch_ops(batch);
  while (done < total) {
    for (size_t i = 0; i < batch; ++i) {
      const auto [offset, len] = next_op(rng);
      batch_ops[i].offset = offset;
      batch_ops[i].iov = {{buf.get() + i * max_op, len}};
      done += len;
    }
    if (!Check(reader->Read(batch_ops), "read")) std::exit(1);
    ops += batch;
  }
  const double secs = Seconds(started);
  const sqkv::BatchReaderCounters c = reader->counters();
  Figure f;
  f.mbps = static_cast<double>(c.bytes) / secs / 1e6;
  f.ops_per_s = static_cast<double>(ops) / secs;
  f.p50_us = c.LatencyQuantileMicros(0.5);
  f.p99_us = c.LatencyQuantileMicros(0.99);
  f.direct_share = static_cast<double>(c.direct_bytes) / static_cast<double>(c.bytes);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path = "./disk_read_bench.dat";
  uint64_t gib = 2;
  bool keep = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--file") == 0 && i + 1 < argc)
      path = argv[++i];
    else if (std::strcmp(argv[i], "--gib") == 0 && i + 1 < argc)
      gib = std::strtoull(argv[++i], nullptr, 10);
    else if (std::strcmp(argv[i], "--keep") == 0)
      keep = true;
  }
  const uint64_t file_bytes = gib << 30;
  const uint64_t blocks = file_bytes / kBlock;
  std::printf(
      "file %s, %llu GiB, written with random bytes, fsynced, dropped from the page cache\n",
      path.c_str(), static_cast<unsigned long long>(gib));
  const auto w = Clock::now();
  if (!WriteFile(path, file_bytes)) return 1;
  std::printf("write + fsync: %.1f s\n\n", Seconds(w));

  const double dd1 = DdMBps(path);
  std::printf("%-44s %9s %9s %9s %9s %7s %8s\n", "read", "MB/s", "vs dd", "ops/s", "p50 us",
              "p99 us", "direct");
  std::printf("%-44s %9.0f %9s\n", "dd bs=4M iflag=direct (sequential, QD 1)", dd1, "1.00");
  auto print = [&](const char* name, const Figure& f) {
    std::printf("%-44s %9.0f %9.2f %9.0f %9llu %7llu %7.0f%%\n", name, f.mbps, f.mbps / dd1,
                f.ops_per_s, static_cast<unsigned long long>(f.p50_us),
                static_cast<unsigned long long>(f.p99_us), 100 * f.direct_share);
  };

  // Large coalesced reads: what a query's runs of adjacent selected pages become.
  uint64_t seq = 0;
  print("4 MiB sequential, 1 op per call (dd's shape)",
        Measure(path, file_bytes, 1, 4 * kMiB, [&](std::mt19937_64&) {
          const uint64_t off = seq;
          seq = (seq + 4 * kMiB) % file_bytes;
          return std::pair<uint64_t, size_t>{off, 4 * kMiB};
        }));
  seq = 0;
  print("4 MiB sequential, 16 ops per call",
        Measure(path, file_bytes, 16, 4 * kMiB, [&](std::mt19937_64&) {
          const uint64_t off = seq;
          seq = (seq + 4 * kMiB) % file_bytes;
          return std::pair<uint64_t, size_t>{off, 4 * kMiB};
        }));
  for (size_t batch : {1, 8, 32}) {
    const std::string name = "1-4 MiB random, " + std::to_string(batch) + " ops per call";
    print(name.c_str(), Measure(path, file_bytes, batch, 4 * kMiB, [&](std::mt19937_64& rng) {
            const uint64_t len = (kMiB / kBlock + rng() % (3 * kMiB / kBlock + 1)) * kBlock;
            const uint64_t off = rng() % (blocks - len / kBlock) * kBlock;
            return std::pair<uint64_t, size_t>{off, len};
          }));
  }
  // Page reads: 8 KiB pages scattered over the file, many per call (a query's isolated pages).
  constexpr uint64_t kPage = 8192;
  for (size_t batch : {1, 64, 256}) {
    const std::string name = "8 KiB random pages, " + std::to_string(batch) + " per call";
    const uint64_t total = batch == 1 ? 64 * kMiB : 512 * kMiB;
    print(name.c_str(), Measure(path, total, batch, kPage, [&](std::mt19937_64& rng) {
            return std::pair<uint64_t, size_t>{rng() % (file_bytes / kPage) * kPage, kPage};
          }));
  }
  const double dd2 = DdMBps(path);
  std::printf("%-44s %9.0f %9.2f\n", "dd again, after the runs", dd2, dd2 / dd1);
  if (!keep) ::unlink(path.c_str());
  return 0;
}
