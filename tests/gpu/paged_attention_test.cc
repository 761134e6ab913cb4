// GPU paged attention and state merging against the float64 reference and the CPU kernels, on
// fresh random pools with scattered page lists, partial pages, empty segments and NaN padding.
#include "gpu/paged_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "compute/attention.h"
#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "index/head_index.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing/testing.h"

namespace sqkv::gpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct SegmentSpec {
  int rows = 0;
  int pages = 0;
};

struct CaseSpec {
  DType dtype = DType::kBF16;
  int head_dim = 128;
  int page_tokens = 16;
  std::vector<SegmentSpec> segments;
  int extra_max_pages = 0;  // slack on the host bounds
  int extra_max_rows = 0;
  float q_stddev = 1.f;
  bool overlap_previous_kernel = false;  // PagedAttentionArgs::overlap_previous_kernel
  bool full_pages = false;  // every page holds page_tokens tokens (no partial pages)
  // >= 0: the keys of the first segment's pages from this one on (in list order) scaled by
  // hot_scale, so its scores jump there
  int hot_from_page = -1;
  float hot_scale = 1.f;
};

// Error bounds per storage dtype: ‖out − ref‖/‖ref‖ and max |lse − lse_ref|.
struct Tolerance {
  double rel;
  double lse;
};
Tolerance TolFor(DType t) {
  switch (t) {
    case DType::kF32:
      return {1e-5, 1e-4};
    case DType::kF16:
      return {2e-3, 4e-3};
    case DType::kBF16:
      return {1e-2, 3e-2};
  }
  return {0, 0};
}

// A pool, page lists and queries in host memory. Each pool page has its own valid count; slots
// past it hold NaN, so any read of padding shows up in the result.
struct HostCase {
  CaseSpec spec;
  int pool_pages = 0;
  std::vector<uint8_t> pool;           // (pool_pages, 2, page_tokens, head_dim) in spec.dtype
  std::vector<float> pool_f;           // the same, as float32 (exactly what the dtype holds)
  std::vector<int32_t> page_valid_of;  // (pool_pages)
  std::vector<int32_t> seg_q_row, seg_rows, seg_page_offset, seg_page_count;
  std::vector<int32_t> page_ids, page_valid;
  int total_rows = 0;
  std::vector<float> q;              // (total_rows, head_dim)
  std::vector<bool> row_in_segment;  // (total_rows): false for the gaps between segments
  int max_pages = 0, max_rows = 0;
};

HostCase MakeCase(const CaseSpec& spec, std::mt19937_64& rng) {
  HostCase c;
  c.spec = spec;
  const int pt = spec.page_tokens, d = spec.head_dim;
  int total_pages = 0;
  for (const auto& s : spec.segments) total_pages += s.pages;
  c.pool_pages = std::max(8, total_pages * 3 / 2 + 3);
  std::uniform_int_distribution<int> coin(0, 2);
  std::uniform_int_distribution<int> partial(1, pt);
  c.page_valid_of.resize(c.pool_pages);
  for (auto& v : c.page_valid_of) {
    v = !spec.full_pages && coin(rng) == 0 ? partial(rng) : pt;  // ~1/3 partial
  }

  const size_t page_elems = 2ull * pt * d;
  c.pool_f = testing::RoundTrip(spec.dtype, testing::RandomNormal(c.pool_pages * page_elems, rng));
  for (int p = 0; p < c.pool_pages; ++p) {
    for (int half = 0; half < 2; ++half) {
      for (int t = c.page_valid_of[p]; t < pt; ++t) {
        float* row = c.pool_f.data() + p * page_elems + (static_cast<size_t>(half) * pt + t) * d;
        std::fill(row, row + d, std::numeric_limits<float>::quiet_NaN());
      }
    }
  }
  c.pool.resize(c.pool_f.size() * DTypeSize(spec.dtype));
  FromFloat(spec.dtype, c.pool_f.data(), c.pool.data(), c.pool_f.size());

  std::vector<int32_t> order(c.pool_pages);
  std::iota(order.begin(), order.end(), 0);
  std::uniform_int_distribution<int> gap(0, 3);
  int row = 0;
  for (const auto& s : spec.segments) {
    std::shuffle(order.begin(), order.end(), rng);
    c.page_ids.resize(c.page_ids.size() + gap(rng), -7);  // unused list entries between segments
    c.page_valid.resize(c.page_ids.size(), -7);
    c.seg_page_offset.push_back(static_cast<int32_t>(c.page_ids.size()));
    c.seg_page_count.push_back(s.pages);
    for (int i = 0; i < s.pages; ++i) {
      c.page_ids.push_back(order[i]);
      c.page_valid.push_back(c.page_valid_of[order[i]]);
    }
    row += gap(rng);  // rows between segments are never written
    c.seg_q_row.push_back(row);
    c.seg_rows.push_back(s.rows);
    row += s.rows;
    c.max_pages = std::max(c.max_pages, s.pages);
    c.max_rows = std::max(c.max_rows, s.rows);
  }
  if (spec.hot_from_page >= 0 && !spec.segments.empty()) {
    for (int i = spec.hot_from_page; i < spec.segments[0].pages; ++i) {
      float* k = c.pool_f.data() + c.page_ids[c.seg_page_offset[0] + i] * page_elems;  // K half
      for (size_t e = 0; e < static_cast<size_t>(pt) * d; ++e) k[e] *= spec.hot_scale;
    }
    c.pool_f = testing::RoundTrip(spec.dtype, c.pool_f);
    FromFloat(spec.dtype, c.pool_f.data(), c.pool.data(), c.pool_f.size());
  }
  c.page_ids.push_back(-7);  // never empty, so the device list always exists
  c.page_valid.push_back(-7);
  c.total_rows = row + gap(rng) + 1;
  c.max_pages += spec.extra_max_pages;
  c.max_rows += spec.extra_max_rows;
  c.q = testing::RandomNormal(static_cast<size_t>(c.total_rows) * d, rng, spec.q_stddev);
  c.row_in_segment.assign(c.total_rows, false);
  for (size_t s = 0; s < spec.segments.size(); ++s) {
    for (int r = 0; r < c.seg_rows[s]; ++r) c.row_in_segment[c.seg_q_row[s] + r] = true;
  }
  return c;
}

struct DeviceResult {
  std::vector<float> out, lse;
};

// Uploads, poisons out / lse / workspace with 0xff (NaN) and runs the attention.
DeviceResult RunOnDevice(const HostCase& c) {
  const auto& s = c.spec;
  DeviceResult res;
  DeviceBuffer pool, seg_q_row, seg_rows, seg_off, seg_count, ids, valid, q, out, lse, ws;
  EXPECT_TRUE(Upload(c.pool, &pool).ok());
  EXPECT_TRUE(Upload(c.seg_q_row, &seg_q_row).ok());
  EXPECT_TRUE(Upload(c.seg_rows, &seg_rows).ok());
  EXPECT_TRUE(Upload(c.seg_page_offset, &seg_off).ok());
  EXPECT_TRUE(Upload(c.seg_page_count, &seg_count).ok());
  EXPECT_TRUE(Upload(c.page_ids, &ids).ok());
  EXPECT_TRUE(Upload(c.page_valid, &valid).ok());
  EXPECT_TRUE(Upload(c.q, &q).ok());
  const size_t out_elems = static_cast<size_t>(c.total_rows) * s.head_dim;
  EXPECT_TRUE(out.Allocate(out_elems * sizeof(float)).ok());
  EXPECT_TRUE(lse.Allocate(c.total_rows * sizeof(float)).ok());
  EXPECT_TRUE(out.Fill(0xff).ok());
  EXPECT_TRUE(lse.Fill(0xff).ok());

  PagedAttentionArgs a;
  a.dtype = s.dtype;
  a.head_dim = s.head_dim;
  a.page_tokens = s.page_tokens;
  a.scale = 1.f / std::sqrt(static_cast<float>(s.head_dim));
  a.pool = pool.get();
  a.num_segments = static_cast<int>(c.seg_rows.size());
  a.seg_q_row = seg_q_row.as<int32_t>();
  a.seg_rows = seg_rows.as<int32_t>();
  a.seg_page_offset = seg_off.as<int32_t>();
  a.seg_page_count = seg_count.as<int32_t>();
  a.page_ids = ids.as<int32_t>();
  a.page_valid = valid.as<int32_t>();
  a.max_pages_per_segment = c.max_pages;
  a.max_rows_per_segment = c.max_rows;
  a.overlap_previous_kernel = s.overlap_previous_kernel;
  a.wgmma = !testing::MmaSyncKernels();
  a.q = q.as<float>();
  a.out = out.as<float>();
  a.lse = lse.as<float>();
  const size_t ws_bytes = PagedAttentionWorkspaceBytes(a);
  EXPECT_TRUE(ws.Allocate(ws_bytes).ok());
  EXPECT_TRUE(ws.Fill(0xff).ok());
  a.workspace = ws.get();

  Stream stream;
  EXPECT_TRUE(Stream::Create(&stream).ok());
  const Status st = LaunchPagedAttention(a, stream.get());
  EXPECT_TRUE(st.ok()) << st.ToString();
  const Status sync = stream.Sync();
  EXPECT_TRUE(sync.ok()) << sync.ToString();
  res.out.resize(out_elems);
  res.lse.resize(c.total_rows);
  EXPECT_TRUE(out.CopyToHost(res.out.data(), out_elems * sizeof(float)).ok());
  EXPECT_TRUE(lse.CopyToHost(res.lse.data(), c.total_rows * sizeof(float)).ok());
  return res;
}

bool IsPoison(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u == 0xffffffffu;
}

// Runs one case and checks it against the float64 reference and compute/AttendPages.
void CheckCase(const CaseSpec& spec, const std::string& name) {
  std::mt19937_64 rng(testing::FreshSeed());
  const HostCase c = MakeCase(spec, rng);
  const DeviceResult got = RunOnDevice(c);
  const int d = spec.head_dim, pt = spec.page_tokens;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const size_t page_elems = 2ull * pt * d;
  const size_t page_bytes = PageBytes(pt, d, spec.dtype);

  std::vector<float> got_rows, cpu_rows;
  std::vector<double> ref_rows;
  double lse_err = 0, lse_cpu_err = 0;
  int unwritten = 0, touched_gaps = 0, bad_empty = 0;
  for (int r = 0; r < c.total_rows; ++r) {
    if (c.row_in_segment[r]) continue;
    touched_gaps += !IsPoison(got.lse[r]);
    for (int j = 0; j < d; ++j) touched_gaps += !IsPoison(got.out[static_cast<size_t>(r) * d + j]);
  }
  for (size_t s = 0; s < spec.segments.size(); ++s) {
    const int rows = c.seg_rows[s], q_row = c.seg_q_row[s];
    if (rows == 0) continue;
    std::vector<float> keys, values;
    std::vector<PageRef> refs;
    for (int i = 0; i < c.seg_page_count[s]; ++i) {
      const int pid = c.page_ids[c.seg_page_offset[s] + i];
      const int valid = c.page_valid[c.seg_page_offset[s] + i];
      const float* page = c.pool_f.data() + pid * page_elems;
      keys.insert(keys.end(), page, page + static_cast<size_t>(valid) * d);
      values.insert(values.end(), page + static_cast<size_t>(pt) * d,
                    page + static_cast<size_t>(pt + valid) * d);
      refs.push_back(PageRef{c.pool.data() + pid * page_bytes, valid});
    }
    std::vector<int32_t> use(keys.size() / d);
    std::iota(use.begin(), use.end(), 0);
    const float* qs = c.q.data() + static_cast<size_t>(q_row) * d;
    std::vector<double> ref_out, ref_lse;
    testing::ReferenceAttention(qs, rows, d, keys.data(), values.data(), use, scale, &ref_out,
                                &ref_lse);
    std::vector<float> cpu_out(static_cast<size_t>(rows) * d), cpu_lse(rows);
    AttendPages(qs, rows, d, static_cast<float>(scale), spec.dtype, pt, refs.data(),
                static_cast<int>(refs.size()), cpu_out.data(), cpu_lse.data());
    const float* g = got.out.data() + static_cast<size_t>(q_row) * d;
    for (int r = 0; r < rows; ++r) {
      const float gl = got.lse[q_row + r];
      unwritten += IsPoison(gl);
      for (int j = 0; j < d; ++j) unwritten += std::isnan(g[static_cast<size_t>(r) * d + j]);
      if (use.empty()) {
        bad_empty += gl != -kInf;
        for (int j = 0; j < d; ++j) bad_empty += g[static_cast<size_t>(r) * d + j] != 0.f;
        continue;
      }
      lse_err = std::max(lse_err, std::abs(static_cast<double>(gl) - ref_lse[r]));
      lse_cpu_err = std::max(lse_cpu_err, std::abs(static_cast<double>(gl) - cpu_lse[r]));
    }
    if (use.empty()) continue;
    got_rows.insert(got_rows.end(), g, g + static_cast<size_t>(rows) * d);
    cpu_rows.insert(cpu_rows.end(), cpu_out.begin(), cpu_out.end());
    ref_rows.insert(ref_rows.end(), ref_out.begin(), ref_out.end());
  }
  EXPECT_EQ(unwritten, 0) << name << ": rows of a segment left unwritten (NaN)";
  EXPECT_EQ(touched_gaps, 0) << name << ": rows outside every segment were written";
  EXPECT_EQ(bad_empty, 0) << name << ": empty segments must give lse = -inf and out = 0";
  if (ref_rows.empty()) return;
  const double rel = testing::RelativeError(got_rows.data(), ref_rows.data(), ref_rows.size());
  std::vector<double> cpu_d(cpu_rows.begin(), cpu_rows.end());
  const double rel_cpu = testing::RelativeError(got_rows.data(), cpu_d.data(), cpu_d.size());
  const Tolerance tol = TolFor(spec.dtype);
  // q is rounded to the storage type for the tensor cores; the score error that makes grows with
  // the score scale, so the lse bound does too.
  const double lse_tol = tol.lse * std::max(1.f, spec.q_stddev * std::max(1.f, spec.hot_scale));
  std::printf(
      "[ metric ] %-34s %-4s d=%-3d pt=%-2d rel_ref=%.3g rel_cpu=%.3g lse_abs=%.3g "
      "lse_cpu_abs=%.3g\n",
      name.c_str(), DTypeName(spec.dtype), d, pt, rel, rel_cpu, lse_err, lse_cpu_err);
  EXPECT_LE(rel, tol.rel) << name;
  EXPECT_LE(rel_cpu, tol.rel) << name;
  EXPECT_LE(lse_err, lse_tol) << name;
  EXPECT_LE(lse_cpu_err, lse_tol) << name;
}

constexpr DType kAllDTypes[] = {DType::kBF16, DType::kF16, DType::kF32};

TEST(PagedAttentionTest, SmallDecode) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    for (int d : {64, 128}) {
      CaseSpec spec;
      spec.dtype = t;
      spec.head_dim = d;
      spec.segments = {{4, 37}, {1, 1}, {7, 0}, {4, 12}, {16, 5}};
      CheckCase(spec, "decode rows 1/4/7/16");
    }
  }
}

TEST(PagedAttentionTest, SmallDecodeTwoRowTiles) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    CaseSpec spec;
    spec.dtype = t;
    spec.segments = {{32, 29}, {17, 3}, {20, 0}};
    CheckCase(spec, "decode rows 17..32");
  }
}

TEST(PagedAttentionTest, SmallPrefill) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    for (int d : {64, 128}) {
      CaseSpec spec;
      spec.dtype = t;
      spec.head_dim = d;
      spec.segments = {{300, 21}, {33, 0}, {129, 1}, {64, 9}};
      CheckCase(spec, "prefill rows 33..300");
    }
  }
}

TEST(PagedAttentionTest, SmallPageTokens) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    for (int pt : {8, 24, 32, 64}) {
      CaseSpec spec;
      spec.dtype = t;
      spec.page_tokens = pt;
      spec.head_dim = pt == 24 ? 64 : 128;
      spec.segments = {{4, 11}, {1, 0}, {7, 3}};
      CheckCase(spec, "decode page_tokens");
      spec.segments = {{100, 7}, {40, 2}};
      CheckCase(spec, "prefill page_tokens");
    }
  }
}

TEST(PagedAttentionTest, SmallSlackBounds) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    CaseSpec spec;
    spec.dtype = t;
    spec.extra_max_pages = 50;
    spec.extra_max_rows = 5;
    spec.segments = {{4, 2}, {4, 0}, {3, 9}};
    CheckCase(spec, "decode slack bounds");
    spec.segments = {{70, 2}, {50, 0}};
    CheckCase(spec, "prefill slack bounds");
  }
}

TEST(PagedAttentionTest, SmallLargeScores) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    CaseSpec spec;
    spec.dtype = t;
    spec.q_stddev = 12.f;  // scores of tens: a near one-hot softmax
    spec.segments = {{4, 40}, {200, 30}};
    CheckCase(spec, "large scores");
  }
}

// Scores that jump far above the running max partway through a segment's keys (the first
// segment's keys ×8 from its 9th page on, whole pages, so the jump falls on a 128-key tile
// boundary inside one block's keys): the prefill kernels must rescale and stay exact. The lse
// bound scales with the hot keys' scores (CheckCase).
TEST(PagedAttentionTest, SmallJumpingScores) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    CaseSpec spec;
    spec.dtype = t;
    spec.q_stddev = 2.f;
    spec.full_pages = true;
    spec.hot_from_page = 8;
    spec.hot_scale = 8.f;
    spec.segments = {{4096, 60}, {4, 60}, {300, 20}};
    CheckCase(spec, "jumping scores");
  }
}

TEST(PagedAttentionTest, DecodeManySplits) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : {DType::kBF16, DType::kF16}) {
    for (int d : {64, 128}) {
      CaseSpec spec;
      spec.dtype = t;
      spec.head_dim = d;
      spec.segments = {{4, 2500}, {4, 900}, {1, 0}, {8, 1}, {32, 1700}};
      CheckCase(spec, "decode long lists (splits)");
    }
  }
  CaseSpec spec;
  spec.dtype = DType::kF32;
  spec.segments = {{4, 1500}, {7, 10}};
  CheckCase(spec, "decode long lists (splits)");
}

// Scratch bytes of a spec's launch (the sizing needs no device pointers).
size_t WorkspaceBytesFor(const CaseSpec& spec, int max_pages, int max_rows) {
  PagedAttentionArgs a;
  a.dtype = spec.dtype;
  a.head_dim = spec.head_dim;
  a.page_tokens = spec.page_tokens;
  a.scale = 0.1f;
  a.num_segments = static_cast<int>(spec.segments.size());
  a.max_pages_per_segment = max_pages;
  a.max_rows_per_segment = max_rows;
  a.wgmma = !testing::MmaSyncKernels();
  return PagedAttentionWorkspaceBytes(a);
}

// The engine plans the grid from the lookup's page capacity, well above the pages it lists: the
// keys are cut across the splits from the device counts, so the splits of a segment share them
// evenly and the merge must count the same splits. Host bounds 2-4x the largest list, several
// splits per segment, with and without the dependent launch.
TEST(PagedAttentionTest, SplitsUnderLooseBound) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    for (bool overlap : {false, true}) {
      CaseSpec spec;
      spec.dtype = t;
      spec.overlap_previous_kernel = overlap;
      spec.segments = {{4, 600}, {4, 37}, {1, 0}, {16, 350}, {32, 3}};
      spec.extra_max_pages = 1400;
      // Decode scratch holds only split partial states: more than none means splits > 1.
      EXPECT_GT(WorkspaceBytesFor(spec, 2000, 32), 0u) << DTypeName(t);
      CheckCase(spec, overlap ? "decode loose bound, dependent" : "decode loose bound");
      spec.segments = {{300, 400}, {150, 40}, {50, 0}, {40, 2}};
      spec.extra_max_pages = 800;
      CheckCase(spec, overlap ? "prefill loose bound, dependent" : "prefill loose bound");
    }
  }
}

TEST(PagedAttentionTest, PrefillSplits) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    CaseSpec spec;
    spec.dtype = t;
    spec.segments = {{300, 700}, {150, 40}, {50, 0}};
    CheckCase(spec, "prefill long lists (splits)");
  }
  // The pre-pass cuts a segment's list into blocks of 256 pages (up to 16 blocks a segment, so
  // beyond 4,096 pages a block takes several steps of 256), each summing the slots before it:
  // lists that end inside a block, on a block's edge, past 4,096 pages, and page sizes whose
  // writes take 16 or 32 lanes a page.
  CaseSpec spec;
  spec.segments = {{40, 2100}, {33, 1025}, {9, 256}, {5, 257}};
  CheckCase(spec, "prefill lists over 256 pages");
  spec.segments = {{20, 4500}, {8, 300}, {4, 0}, {3, 4097}};
  CheckCase(spec, "prefill lists over 4,096 pages");
  for (int page_tokens : {8, 32}) {
    spec.page_tokens = page_tokens;
    spec.segments = {{24, 700}, {7, 513}};
    CheckCase(spec, page_tokens == 8 ? "prefill lists, 8-token pages"
                                     : "prefill lists, 32-token pages");
  }
}

TEST(PagedAttentionTest, Prefill4096Rows) {
  SKIP_WITHOUT_DEVICE();
  for (DType t : kAllDTypes) {
    CaseSpec spec;
    spec.dtype = t;
    spec.segments = {{4096, 60}, {1000, 5}};
    CheckCase(spec, "prefill 4096 rows");
  }
  CaseSpec spec;
  spec.dtype = DType::kBF16;
  spec.head_dim = 64;
  spec.segments = {{4096, 40}};
  CheckCase(spec, "prefill 4096 rows");
}

TEST(PagedAttentionTest, SmallRepeatable) {
  SKIP_WITHOUT_DEVICE();
  // The same inputs twice must give the same bits: a race would show as a difference.
  for (DType t : kAllDTypes) {
    for (int rows : {4, 300}) {
      CaseSpec spec;
      spec.dtype = t;
      spec.segments = {{rows, 400}, {rows, 3}};
      std::mt19937_64 rng(testing::FreshSeed());
      const HostCase c = MakeCase(spec, rng);
      const DeviceResult a = RunOnDevice(c), b = RunOnDevice(c);
      EXPECT_EQ(0, std::memcmp(a.out.data(), b.out.data(), a.out.size() * sizeof(float)))
          << DTypeName(t) << " rows " << rows;
      EXPECT_EQ(0, std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float)))
          << DTypeName(t) << " rows " << rows;
    }
  }
}

TEST(PagedAttentionTest, SmallRejectsBadArguments) {
  SKIP_WITHOUT_DEVICE();
  PagedAttentionArgs a;
  int32_t dummy_i[4] = {};
  alignas(16) float dummy_f[4] = {};
  a.num_segments = 1;
  a.max_rows_per_segment = 1;
  a.max_pages_per_segment = 1;
  a.scale = 0.1f;
  a.pool = dummy_f;
  a.seg_q_row = a.seg_rows = a.seg_page_offset = a.seg_page_count = dummy_i;
  a.page_ids = a.page_valid = dummy_i;
  a.q = a.out = a.lse = dummy_f;
  PagedAttentionArgs bad = a;
  bad.head_dim = 96;
  EXPECT_TRUE(LaunchPagedAttention(bad, nullptr).IsInvalidArgument());
  EXPECT_EQ(PagedAttentionWorkspaceBytes(bad), 0u);
  bad = a;
  bad.page_tokens = 12;
  EXPECT_TRUE(LaunchPagedAttention(bad, nullptr).IsInvalidArgument());
  bad = a;
  bad.q = nullptr;
  EXPECT_TRUE(LaunchPagedAttention(bad, nullptr).IsInvalidArgument());
  bad = a;
  bad.scale = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(LaunchPagedAttention(bad, nullptr).IsInvalidArgument());
  bad = a;
  bad.num_segments = 0;  // nothing to do
  EXPECT_TRUE(LaunchPagedAttention(bad, nullptr).ok());

  // Sizing needs no pointers, and gives what the full argument set gives.
  PagedAttentionArgs sizing;
  sizing.num_segments = 8;
  sizing.max_rows_per_segment = 300;  // prefill: the compact key lists always need scratch
  sizing.max_pages_per_segment = 1000;
  PagedAttentionArgs full = a;
  full.num_segments = sizing.num_segments;
  full.max_rows_per_segment = sizing.max_rows_per_segment;
  full.max_pages_per_segment = sizing.max_pages_per_segment;
  EXPECT_GT(PagedAttentionWorkspaceBytes(sizing), 0u);
  EXPECT_EQ(PagedAttentionWorkspaceBytes(sizing), PagedAttentionWorkspaceBytes(full));
}

// Random states with some empty rows on either side, merged on the device and on the CPU.
void CheckMerge(int rows, int head_dim) {
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<float> oa = testing::RandomNormal(static_cast<size_t>(rows) * head_dim, rng);
  std::vector<float> ob = testing::RandomNormal(static_cast<size_t>(rows) * head_dim, rng);
  std::vector<float> la = testing::RandomNormal(rows, rng, 3.f);
  std::vector<float> lb = testing::RandomNormal(rows, rng, 3.f);
  for (int r = 0; r < rows; ++r) {
    const int kind = r % 5;  // 0: a empty, 1: b empty, 2: both empty, else both present
    if (kind == 0 || kind == 2) {
      la[r] = -kInf;
      std::fill(oa.begin() + static_cast<size_t>(r) * head_dim,
                oa.begin() + static_cast<size_t>(r + 1) * head_dim, 0.f);
    }
    if (kind == 1 || kind == 2) {
      lb[r] = -kInf;
      std::fill(ob.begin() + static_cast<size_t>(r) * head_dim,
                ob.begin() + static_cast<size_t>(r + 1) * head_dim, 0.f);
    }
  }
  DeviceBuffer d_oa, d_la, d_ob, d_lb;
  ASSERT_TRUE(Upload(oa, &d_oa).ok());
  ASSERT_TRUE(Upload(la, &d_la).ok());
  ASSERT_TRUE(Upload(ob, &d_ob).ok());
  ASSERT_TRUE(Upload(lb, &d_lb).ok());
  const Status st = LaunchMergeStates(d_oa.as<float>(), d_la.as<float>(), d_ob.as<float>(),
                                      d_lb.as<float>(), rows, head_dim, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(Synchronize().ok());
  std::vector<float> got_o(oa.size()), got_l(rows);
  ASSERT_TRUE(d_oa.CopyToHost(got_o.data(), got_o.size() * sizeof(float)).ok());
  ASSERT_TRUE(d_la.CopyToHost(got_l.data(), got_l.size() * sizeof(float)).ok());
  MergeStates(oa.data(), la.data(), ob.data(), lb.data(), rows, head_dim);
  double max_o = 0, max_l = 0;
  int nan = 0;
  for (size_t i = 0; i < oa.size(); ++i) {
    nan += std::isnan(got_o[i]);
    max_o = std::max(max_o, static_cast<double>(std::abs(got_o[i] - oa[i])));
  }
  for (int r = 0; r < rows; ++r) {
    if (la[r] == -kInf || got_l[r] == -kInf) {
      EXPECT_EQ(got_l[r], la[r]) << "row " << r;
      continue;
    }
    max_l = std::max(max_l, static_cast<double>(std::abs(got_l[r] - la[r])));
  }
  std::printf("[ metric ] merge rows=%d d=%d max|o-cpu|=%.3g max|lse-cpu|=%.3g\n", rows, head_dim,
              max_o, max_l);
  EXPECT_EQ(nan, 0);
  EXPECT_LE(max_o, 1e-5);
  EXPECT_LE(max_l, 1e-5);
}

TEST(MergeStatesGpuTest, SmallMatchesCpu) {
  SKIP_WITHOUT_DEVICE();
  CheckMerge(1000, 128);
  CheckMerge(77, 64);
  CheckMerge(5, 80);  // any head_dim
  EXPECT_TRUE(LaunchMergeStates(nullptr, nullptr, nullptr, nullptr, 0, 128, nullptr).ok());
  EXPECT_TRUE(
      LaunchMergeStates(nullptr, nullptr, nullptr, nullptr, 3, 128, nullptr).IsInvalidArgument());
}

}  // namespace
}  // namespace sqkv::gpu
