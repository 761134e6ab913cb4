// Shared test helpers: fresh random inputs, scratch directories, and float64 references that are
// written independently of the code under test.
#pragma once

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace sqkv::testing {

// A seed that differs on every run unless SQKV_TEST_SEED is set; printed so a failure can be
// replayed.
uint64_t FreshSeed();

// n floats from N(mean, stddev); never all zero.
std::vector<float> RandomNormal(size_t n, std::mt19937_64& rng, float stddev = 1.f, float mean = 0.f);

// Rounds every element through `t` (what storing in that dtype would keep).
std::vector<float> RoundTrip(DType t, const std::vector<float>& x);

// A directory under the system temp dir, removed (with its contents) on destruction.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Writes `bytes` to `path` (replacing it); a failed write fails the calling test.
void WriteBytes(const std::string& path, const std::string& bytes);

// The whole file at `path`; empty if it cannot be read.
std::string ReadBytes(const std::string& path);

// Float64 exact attention of rows of q over the listed keys.
// q: (rows, d); keys, values: (tokens, d); use: indices into keys (any order);
// out: (rows, d); lse: (rows), natural log of Σ exp(scale·q·k). Empty `use`: lse = -inf, out = 0.
void ReferenceAttention(const float* q, int rows, int d, const float* keys, const float* values,
                        const std::vector<int32_t>& use, double scale, std::vector<double>* out,
                        std::vector<double>* lse);

// ‖a − b‖ / ‖b‖ (b the reference); +inf if either holds a NaN.
double RelativeError(const float* a, const double* b, size_t n);

// The sqkv executable of this build ($SQKV_BIN_DIR/tools/sqkv, as ctest sets it).
std::string SqkvBinary();

struct CmdResult {
  int code = -1;  // exit status, or 128 + signal
  std::string out, err;
};

// Runs sqkv with `args` (stdin /dev/null) and captures its output; extra_env entries like
// "SQKV_TEST_CRASH_AT=published" are set for that run only.
CmdResult RunSqkv(const std::vector<std::string>& args,
                  const std::vector<std::string>& extra_env = {});

}  // namespace sqkv::testing
