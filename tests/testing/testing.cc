#include "tests/testing/testing.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>

namespace sqkv::testing {

uint64_t FreshSeed() {
  static const uint64_t seed = [] {
    if (const char* s = std::getenv("SQKV_TEST_SEED")) return uint64_t{std::strtoull(s, nullptr, 10)};
    std::random_device rd;
    return uint64_t{(static_cast<uint64_t>(rd()) << 32) ^ rd()};
  }();
  static uint64_t calls = 0;
  uint64_t s = seed + 0x9e3779b97f4a7c15ull * ++calls;
  std::fprintf(stderr, "[seed] SQKV_TEST_SEED=%llu (call %llu)\n",
               static_cast<unsigned long long>(seed), static_cast<unsigned long long>(calls));
  return s;
}

std::vector<float> RandomNormal(size_t n, std::mt19937_64& rng, float stddev, float mean) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  if (n > 0 && v[0] == 0.f) v[0] = stddev;  // never all zero
  return v;
}

std::vector<float> RoundTrip(DType t, const std::vector<float>& x) {
  std::vector<uint8_t> buf(x.size() * DTypeSize(t));
  FromFloat(t, x.data(), buf.data(), x.size());
  std::vector<float> y(x.size());
  ToFloat(t, buf.data(), y.data(), x.size());
  return y;
}

ScratchDir::ScratchDir() {
  std::string templ = (std::filesystem::temp_directory_path() / "sqkv-test-XXXXXX").string();
  char* p = mkdtemp(templ.data());
  if (p == nullptr) std::abort();
  path_ = p;
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void ReferenceAttention(const float* q, int rows, int d, const float* keys, const float* values,
                        const std::vector<int32_t>& use, double scale, std::vector<double>* out,
                        std::vector<double>* lse) {
  out->assign(static_cast<size_t>(rows) * d, 0.0);
  lse->assign(rows, -std::numeric_limits<double>::infinity());
  if (use.empty()) return;
  std::vector<double> s(use.size());
  for (int r = 0; r < rows; ++r) {
    double m = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < use.size(); ++i) {
      double dot = 0;
      for (int c = 0; c < d; ++c) {
        dot += static_cast<double>(q[static_cast<size_t>(r) * d + c]) *
               keys[static_cast<size_t>(use[i]) * d + c];
      }
      s[i] = dot * scale;
      m = std::max(m, s[i]);
    }
    double sum = 0;
    for (size_t i = 0; i < use.size(); ++i) {
      double w = std::exp(s[i] - m);
      sum += w;
      for (int c = 0; c < d; ++c) {
        (*out)[static_cast<size_t>(r) * d + c] += w * values[static_cast<size_t>(use[i]) * d + c];
      }
    }
    for (int c = 0; c < d; ++c) (*out)[static_cast<size_t>(r) * d + c] /= sum;
    (*lse)[r] = m + std::log(sum);
  }
}

double RelativeError(const float* a, const double* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return std::numeric_limits<double>::infinity();
    double diff = a[i] - b[i];
    num += diff * diff;
    den += b[i] * b[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

std::string SqkvBinary() {
  const char* dir = std::getenv("SQKV_BIN_DIR");
  return std::string(dir ? dir : ".") + "/tools/sqkv";
}

CmdResult RunSqkv(const std::vector<std::string>& args, const std::vector<std::string>& extra_env) {
  ScratchDir io;
  std::string cmd;
  for (const auto& e : extra_env) cmd += e + " ";
  cmd += "'" + SqkvBinary() + "'";
  for (const auto& a : args) cmd += " '" + a + "'";
  cmd += " >" + io.file("out") + " 2>" + io.file("err") + " </dev/null";
  CmdResult r;
  const int status = std::system(cmd.c_str());
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream o(io.file("out"), std::ios::binary), e(io.file("err"), std::ios::binary);
  r.out.assign(std::istreambuf_iterator<char>(o), {});
  r.err.assign(std::istreambuf_iterator<char>(e), {});
  return r;
}

}  // namespace sqkv::testing
