// The device lookup against a float64 reference of index/select.h: the same clusters (up to
// clusters whose scores lie within the arithmetic's error bound of the cut: kTieTol for float32
// centroids, testing::LookupTolerance for the 16-bit storage), the page list those clusters imply,
// and the centroids scored. "[ metric ]" lines report how many selected clusters differed from the
// reference (the observed mismatch rate), per test and centroid storage.
#include "gpu/lookup.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <numeric>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "gpu/device.h"
#include "gpu/device_buffer.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/gpu/lookup_testing.h"
#include "tests/testing/testing.h"

namespace sqkv::gpu {
namespace {

using testing::RefMode;
using testing::RefSelect;
using testing::RefSelection;
using testing::SyntheticIndex;

constexpr double kTieTol = 1e-5;

struct Head {
  HeadIndex x;
  std::vector<int32_t> table;  // head-local page -> pool page
  std::vector<int32_t> sorted_sizes;
  DeviceBuffer centroids, sizes, page_begin, dtable, l1c, l1s, l1b;
  DeviceBuffer centroids16, l1c16;  // the 16-bit storage (gpu/lookup.h)
  float scale16 = 1.f;
};

// Uploads both centroid storages of h->x.
void UploadCentroids(Head* h) {
  ASSERT_TRUE(Upload(h->x.centroids, &h->centroids).ok());
  std::vector<uint16_t> c16, l1_16;
  h->scale16 = CentroidsToF16(h->x.centroids, h->x.l1_centroids, &c16, &l1_16);
  ASSERT_TRUE(Upload(c16, &h->centroids16).ok());
  if (h->x.hierarchical()) {
    ASSERT_TRUE(Upload(h->x.l1_centroids, &h->l1c).ok());
    ASSERT_TRUE(Upload(l1_16, &h->l1c16).ok());
  }
}

// Pool page ids are a random injection into [0, 4 * pages), so a wrong mapping shows.
void SetUpHead(Head* h);

void MakeHead(std::mt19937_64& rng, int clusters, int d, int pt, int max_size, int num_l1,
              Head* h) {
  h->x = SyntheticIndex(rng, clusters, d, pt, max_size, num_l1);
  std::vector<int32_t> ids(4 * h->x.num_pages());
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  h->table.assign(ids.begin(), ids.begin() + h->x.num_pages());
  SetUpHead(h);
}

// Uploads h->x and h->table.
void SetUpHead(Head* h) {
  const int pages = h->x.num_pages();
  ASSERT_EQ(static_cast<int>(h->table.size()), pages);
  h->sorted_sizes = h->x.cluster_size;
  std::sort(h->sorted_sizes.begin(), h->sorted_sizes.end());
  UploadCentroids(h);
  ASSERT_TRUE(Upload(h->x.cluster_size, &h->sizes).ok());
  ASSERT_TRUE(Upload(h->x.cluster_page_begin, &h->page_begin).ok());
  ASSERT_TRUE(Upload(h->table, &h->dtable).ok());
  if (h->x.hierarchical()) {
    ASSERT_TRUE(Upload(h->x.l1_size, &h->l1s).ok());
    ASSERT_TRUE(Upload(h->x.l1_child_begin, &h->l1b).ok());
  }
}

struct Seg {
  int head = 0;
  int rows = 1;
  std::vector<float> q;  // (rows, d)
  RefMode mode = RefMode::kBudget;
  int budget = 0;
  float threshold = 0.f;
  int l1_budget = 0;
};

struct Out {
  std::vector<int32_t> clusters;
  int32_t tokens = -1, scored = -1;
  std::vector<int32_t> page_ids, page_valid;
  int32_t row_splits = 0, col_splits = 0;  // the plan's pieces (large 16-bit segments)
};

// Tokens target of a keep fraction (a plain ceil; the engine uses KeepTokenTarget).
int Target(double fraction, int tokens) {
  if (fraction <= 0) return 0;
  return std::min(tokens, std::max(1, static_cast<int>(std::ceil(fraction * tokens))));
}

Seg MakeSeg(std::mt19937_64& rng, const Head& h, int head, int rows, RefMode mode,
            double fraction) {
  Seg s;
  s.head = head;
  s.rows = rows;
  s.q = testing::RandomNormal(static_cast<size_t>(rows) * h.x.head_dim, rng, 1.5f);
  s.mode = mode;
  s.budget = Target(fraction, h.x.tokens);
  s.l1_budget = Target(std::min(1.0, 3 * fraction), h.x.tokens);
  return s;
}

// Runs one lookup launch over every segment (f16: the 16-bit centroid storage, else float32);
// `repeat` launches again on the same workspace and checks the second result equals the first.
// A last launch takes the global-memory selection (staged_select = false, for small and large
// segments alike) and the register-loaded decode scorer (bulk_scoring = false), and must give
// exactly the outputs of the default (staged, where the batch allows it; bulk copies on sm_90)
// launches.
void RunLookup(std::vector<Head>& heads, const std::vector<Seg>& segs, int d, int pt,
               std::vector<Out>* out, bool repeat = false, bool f16 = true) {
  std::vector<LookupSegment> ls(segs.size());
  std::vector<float> q;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Seg& s = segs[i];
    Head& h = heads[s.head];
    LookupSegment& l = ls[i];
    if (f16) {
      l.centroids_f16 = h.centroids16.as<uint16_t>();
      l.centroid_scale = h.scale16;
    } else {
      l.centroids = h.centroids.as<float>();
    }
    l.cluster_size = h.sizes.as<int32_t>();
    l.cluster_page_begin = h.page_begin.as<int32_t>();
    l.page_table = h.dtable.as<int32_t>();
    if (h.x.hierarchical()) {
      if (f16) {
        l.l1_centroids_f16 = h.l1c16.as<uint16_t>();
      } else {
        l.l1_centroids = h.l1c.as<float>();
      }
      l.l1_size = h.l1s.as<int32_t>();
      l.l1_child_begin = h.l1b.as<int32_t>();
      l.num_l1 = h.x.num_l1();
    }
    l.num_clusters = h.x.num_clusters();
    l.tokens = h.x.tokens;
    l.q_row = static_cast<int32_t>(q.size() / d);
    l.rows = s.rows;
    q.insert(q.end(), s.q.begin(), s.q.end());
    l.mode = s.mode == RefMode::kBudget      ? LookupMode::kBudget
             : s.mode == RefMode::kThreshold ? LookupMode::kThreshold
                                             : LookupMode::kDense;
    l.budget = s.budget;
    l.threshold = s.threshold;
    l.l1_budget = s.l1_budget;
    l.page_capacity = s.mode == RefMode::kBudget
                          ? BudgetPageBound(h.sorted_sizes, s.budget, pt, h.x.num_pages())
                          : h.x.num_pages();
  }
  LookupLayout layout;
  Status st = PlanLookup(d, &ls, &layout);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const int n = static_cast<int>(segs.size());
  DeviceBuffer dsegs, dq, ws, seg_pages, page_ids, page_valid, seg_clusters, cluster_ids,
      seg_tokens, seg_scored;
  ASSERT_TRUE(dsegs.Allocate(n * sizeof(LookupSegment)).ok());
  ASSERT_TRUE(dsegs.CopyFromHost(ls.data(), n * sizeof(LookupSegment)).ok());
  ASSERT_TRUE(Upload(q, &dq).ok());
  ASSERT_TRUE(ws.Allocate(LookupWorkspaceBytes(layout)).ok());
  std::vector<uint8_t> tables;
  LookupWorkspaceTables(layout, &tables);
  ASSERT_TRUE(ws.Fill(0xff).ok());  // poison: every region must be written before it is read
  ASSERT_TRUE(ws.CopyFromHost(tables.data(), tables.size()).ok());
  const size_t pc = std::max(1, layout.total_page_capacity) * sizeof(int32_t);
  const size_t cc = std::max(1, layout.total_cluster_capacity) * sizeof(int32_t);
  ASSERT_TRUE(seg_pages.Allocate(n * 4).ok());
  ASSERT_TRUE(page_ids.Allocate(pc).ok());
  ASSERT_TRUE(page_valid.Allocate(pc).ok());
  ASSERT_TRUE(seg_clusters.Allocate(n * 4).ok());
  ASSERT_TRUE(cluster_ids.Allocate(cc).ok());
  ASSERT_TRUE(seg_tokens.Allocate(n * 4).ok());
  ASSERT_TRUE(seg_scored.Allocate(n * 4).ok());
  for (DeviceBuffer* b : {&seg_pages, &page_ids, &page_valid, &seg_clusters, &cluster_ids,
                          &seg_tokens, &seg_scored}) {
    ASSERT_TRUE(b->Fill(0xff).ok());
  }
  LookupArgs a;
  a.head_dim = d;
  a.page_tokens = pt;
  a.num_segments = n;
  a.segments = dsegs.as<LookupSegment>();
  a.q = dq.as<float>();
  a.seg_page_count = seg_pages.as<int32_t>();
  a.page_ids = page_ids.as<int32_t>();
  a.page_valid = page_valid.as<int32_t>();
  a.seg_cluster_count = seg_clusters.as<int32_t>();
  a.cluster_ids = cluster_ids.as<int32_t>();
  a.seg_tokens = seg_tokens.as<int32_t>();
  a.seg_scored = seg_scored.as<int32_t>();
  a.workspace = ws.get();
  a.wgmma = !testing::MmaSyncKernels();

  std::vector<Out> first;
  const int rounds = (repeat ? 2 : 1) + 1;
  for (int round = 0; round < rounds; ++round) {
    const bool legacy = round == rounds - 1;
    a.staged_select = !legacy;
    a.bulk_scoring = !legacy;  // the register-loaded decode scorer: the same scores bit for bit
    for (DeviceBuffer* b : {&seg_pages, &page_ids, &page_valid, &seg_clusters, &cluster_ids,
                            &seg_tokens, &seg_scored}) {
      ASSERT_TRUE(b->Fill(0xff).ok());  // poison again: each round writes every output
    }
    st = LaunchLookup(a, layout, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    st = Synchronize();
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<int32_t> np(n), nc(n), nt(n), ns(n);
    std::vector<int32_t> ids(pc / 4), valid(pc / 4), cl(cc / 4);
    ASSERT_TRUE(seg_pages.CopyToHost(np.data(), n * 4).ok());
    ASSERT_TRUE(seg_clusters.CopyToHost(nc.data(), n * 4).ok());
    ASSERT_TRUE(seg_tokens.CopyToHost(nt.data(), n * 4).ok());
    ASSERT_TRUE(seg_scored.CopyToHost(ns.data(), n * 4).ok());
    ASSERT_TRUE(page_ids.CopyToHost(ids.data(), pc).ok());
    ASSERT_TRUE(page_valid.CopyToHost(valid.data(), pc).ok());
    ASSERT_TRUE(cluster_ids.CopyToHost(cl.data(), cc).ok());
    out->assign(n, Out());
    for (int i = 0; i < n; ++i) {
      Out& o = (*out)[i];
      ASSERT_GE(np[i], 0) << "segment " << i << ": page count not written";
      ASSERT_LE(np[i], ls[i].page_capacity);
      ASSERT_GE(nc[i], 0) << "segment " << i;
      ASSERT_LE(nc[i], ls[i].num_clusters);
      o.clusters.assign(cl.begin() + ls[i].cluster_offset,
                        cl.begin() + ls[i].cluster_offset + nc[i]);
      o.page_ids.assign(ids.begin() + ls[i].page_offset, ids.begin() + ls[i].page_offset + np[i]);
      o.page_valid.assign(valid.begin() + ls[i].page_offset,
                          valid.begin() + ls[i].page_offset + np[i]);
      o.tokens = nt[i];
      o.scored = ns[i];
      o.row_splits = ls[i].row_splits;
      o.col_splits = ls[i].col_splits;
    }
    if (round == 0) {
      first = *out;
    } else {
      const char* what = legacy ? "global-memory selection differs" : "relaunch differs";
      for (int i = 0; i < n; ++i) {
        EXPECT_EQ((*out)[i].clusters, first[i].clusters) << what << ", segment " << i;
        EXPECT_EQ((*out)[i].page_ids, first[i].page_ids) << what << ", segment " << i;
        EXPECT_EQ((*out)[i].page_valid, first[i].page_valid) << what << ", segment " << i;
        EXPECT_EQ((*out)[i].tokens, first[i].tokens) << what << ", segment " << i;
        EXPECT_EQ((*out)[i].scored, first[i].scored) << what << ", segment " << i;
      }
    }
  }
  *out = first;
}

// Agreement counts over the segments of one check.
struct Agreement {
  int segments = 0;
  int64_t selected = 0;    // clusters the reference selected
  int64_t mismatched = 0;  // clusters in exactly one of the two selections (all within tolerance)
  int64_t beyond_float32 = 0;  // of those, further than kTieTol from the cut
  double max_gap = 0;          // largest |score - cut| / cut among them
  double max_tol = 0;
};

// The tolerance of one segment's selection (see testing::LookupTolerance). q is rounded to
// binary16 with 16-bit centroids on the large path and on the small path's tensor-core variant
// (head_dim <= 128), which a segment of at most kLookupNarrowRows rows takes when every scored
// small segment of its launch has that few: the bound counts the rounding for every such segment,
// a looser bound where its launch ran the float32 FMA variant instead.
double SegmentTolerance(const Head& h, const Seg& s, bool f16) {
  const bool narrow = s.rows <= kLookupNarrowRows && h.x.head_dim <= 128;
  const bool q_rounded = f16 && (s.rows > kLookupSmallRows || narrow);
  return testing::LookupTolerance(h.x, s.q.data(), s.rows, f16, q_rounded, kTieTol);
}

// Checks one segment against the reference.
void CheckSegment(const Head& h, const Seg& s, const Out& o, int index, bool f16,
                  Agreement* agree) {
  SCOPED_TRACE("segment " + std::to_string(index) + " rows " + std::to_string(s.rows) +
               " clusters " + std::to_string(h.x.num_clusters()) + " l1 " +
               std::to_string(h.x.num_l1()) + (f16 ? " f16" : " f32"));
  const double tol = SegmentTolerance(h, s, f16);
  const RefSelection ref =
      RefSelect(h.x, s.q.data(), s.rows, s.mode, s.budget, s.threshold, s.l1_budget, tol);
  if (ref.kept_children >= 0 && o.scored != ref.scored && ref.l1_near_tie) {
    std::fprintf(stderr, "segment %d: level-1 near-tie changed the kept parents; skipped\n", index);
    return;
  }
  EXPECT_EQ(o.scored, ref.scored);
  EXPECT_TRUE(std::is_sorted(o.clusters.begin(), o.clusters.end()));
  int near = 0;
  double gap = 0;
  EXPECT_EQ(testing::CompareSelection(ref, o.clusters, tol, &near, &gap), "") << "tol " << tol;
  std::vector<int32_t> diff;
  std::set_symmetric_difference(ref.clusters.begin(), ref.clusters.end(), o.clusters.begin(),
                                o.clusters.end(), std::back_inserter(diff));
  for (int32_t c : diff) {
    if (std::abs(ref.score[c] - ref.cut) > kTieTol * std::abs(ref.cut)) ++agree->beyond_float32;
  }
  ++agree->segments;
  agree->selected += static_cast<int64_t>(ref.clusters.size());
  agree->mismatched += near;
  agree->max_gap = std::max(agree->max_gap, gap);
  agree->max_tol = std::max(agree->max_tol, tol);
  std::vector<int32_t> ids, valid;
  int tokens = 0;
  for (int32_t c : o.clusters) {
    if (c < 0 || c >= h.x.num_clusters()) {
      ADD_FAILURE() << "cluster id " << c << " out of range";
      return;
    }
    tokens += h.x.cluster_size[c];
    for (int p = h.x.cluster_page_begin[c]; p < h.x.cluster_page_begin[c + 1]; ++p) {
      ids.push_back(h.table[p]);
      valid.push_back(h.x.PageValidTokens(c, p));
    }
  }
  EXPECT_EQ(o.tokens, tokens);
  EXPECT_EQ(o.page_ids, ids);
  EXPECT_EQ(o.page_valid, valid);
}

void Report(const char* what, bool f16, const Agreement& a) {
  std::printf(
      "[ metric ] lookup %-30s %-3s segments=%d selected=%lld mismatched=%lld (%.3g%%) "
      "beyond_1e-5=%lld max_gap=%.3g tol<=%.3g\n",
      what, f16 ? "f16" : "f32", a.segments, static_cast<long long>(a.selected),
      static_cast<long long>(a.mismatched),
      a.selected > 0 ? 100.0 * static_cast<double>(a.mismatched) / a.selected : 0.0,
      static_cast<long long>(a.beyond_float32), a.max_gap, a.max_tol);
}

void CheckAll(const std::vector<Head>& heads, const std::vector<Seg>& segs,
              const std::vector<Out>& out, bool f16 = true, const char* what = nullptr) {
  ASSERT_EQ(out.size(), segs.size());
  Agreement agree;
  for (size_t i = 0; i < segs.size(); ++i) {
    CheckSegment(heads[segs[i].head], segs[i], out[i], static_cast<int>(i), f16, &agree);
  }
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  Report(what != nullptr ? what : info->name(), f16, agree);
}

// One launch over `segs` (RunLookup, relaunched when `repeat`), then every segment against the
// reference (CheckAll); returns the outputs for further checks.
std::vector<Out> RunAndCheck(std::vector<Head>& heads, const std::vector<Seg>& segs, int d, int pt,
                             bool repeat, bool f16, const char* what = nullptr) {
  std::vector<Out> out;
  RunLookup(heads, segs, d, pt, &out, repeat, f16);
  if (!::testing::Test::HasFatalFailure()) CheckAll(heads, segs, out, f16, what);
  return out;
}

TEST(GpuLookup, BudgetMatchesReferenceAcrossRowCounts) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  // rows = g * n for GQA groups 1, 4, 8; 17 and up take the tiled path.
  const std::vector<int> rows = {1, 4, 8, 16, 17, 64, 100, 1024, 4096};
  std::vector<Head> heads(rows.size());
  std::vector<Seg> segs;
  std::uniform_int_distribution<int> clusters(40, 1500);
  std::uniform_real_distribution<double> frac(0.01, 0.4);
  for (size_t i = 0; i < rows.size(); ++i) {
    MakeHead(rng, clusters(rng), kD, kPt, 40, 0, &heads[i]);
    segs.push_back(
        MakeSeg(rng, heads[i], static_cast<int>(i), rows[i], RefMode::kBudget, frac(rng)));
  }
  for (bool f16 : {true, false}) {
    RunAndCheck(heads, segs, kD, kPt, /*repeat=*/true, f16);
  }
}

TEST(GpuLookup, HeadDim64AndOtherPageSizes) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  for (int pt : {1, 8, 32}) {
    SCOPED_TRACE("page_tokens " + std::to_string(pt));
    std::vector<Head> heads(3);
    std::vector<Seg> segs;
    const int rows[] = {2, 12, 300};
    for (int i = 0; i < 3; ++i) {
      MakeHead(rng, 300 + 200 * i, 64, pt, 70, 0, &heads[i]);
      segs.push_back(MakeSeg(rng, heads[i], i, rows[i], RefMode::kBudget, 0.05 + 0.1 * i));
    }
    for (bool f16 : {true, false}) {
      RunAndCheck(heads, segs, 64, pt, /*repeat=*/false, f16);
    }
  }
}

TEST(GpuLookup, ThresholdAndDenseModes) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(2);
  MakeHead(rng, 900, kD, kPt, 30, 0, &heads[0]);
  MakeHead(rng, 2500, kD, kPt, 30, 0, &heads[1]);
  std::vector<Seg> segs;
  for (int h = 0; h < 2; ++h) {
    for (int rows : {4, 256}) {
      Seg s = MakeSeg(rng, heads[h], h, rows, RefMode::kThreshold, 0.1);
      // A threshold at the reference median: about half the clusters.
      const HeadIndex& x = heads[h].x;
      std::vector<const float*> cents(x.num_clusters());
      for (int c = 0; c < x.num_clusters(); ++c) cents[c] = x.centroids.data() + c * kD;
      std::vector<double> sc =
          testing::RefScores(s.q.data(), rows, kD, cents, x.cluster_size, x.num_clusters());
      std::nth_element(sc.begin(), sc.begin() + sc.size() / 2, sc.end());
      s.threshold = static_cast<float>(sc[sc.size() / 2]);
      segs.push_back(s);
      segs.push_back(MakeSeg(rng, heads[h], h, rows, RefMode::kDense, 0.1));
    }
  }
  for (bool f16 : {true, false}) {
    const std::vector<Out> out = RunAndCheck(heads, segs, kD, kPt, /*repeat=*/false, f16);
    for (size_t i = 0; i < segs.size(); ++i) {
      if (segs[i].mode == RefMode::kDense) {
        EXPECT_EQ(static_cast<int>(out[i].clusters.size()), heads[segs[i].head].x.num_clusters());
      }
    }
  }
}

TEST(GpuLookup, KeepNothingKeepEverythingSingleCluster) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(2);
  MakeHead(rng, 700, kD, kPt, 25, 0, &heads[0]);
  MakeHead(rng, 1, kD, kPt, 200, 0, &heads[1]);  // one cluster of up to 200 tokens
  std::vector<Seg> segs;
  for (int rows : {1, 8, 80}) {
    segs.push_back(MakeSeg(rng, heads[0], 0, rows, RefMode::kBudget, 0.0));  // keeps nothing
    segs.push_back(MakeSeg(rng, heads[0], 0, rows, RefMode::kBudget, 1.0));  // keeps everything
    segs.push_back(MakeSeg(rng, heads[1], 1, rows, RefMode::kBudget, 0.01));
    segs.push_back(MakeSeg(rng, heads[1], 1, rows, RefMode::kDense, 0.0));
  }
  for (bool f16 : {true, false}) {
    const std::vector<Out> out = RunAndCheck(heads, segs, kD, kPt, /*repeat=*/false, f16);
    for (size_t i = 0; i < segs.size(); ++i) {
      if (segs[i].budget == 0 && segs[i].mode == RefMode::kBudget) {
        EXPECT_TRUE(out[i].clusters.empty());
        EXPECT_TRUE(out[i].page_ids.empty());
      }
    }
  }
}

// Duplicated centroids give exactly equal scores on the device too (same arithmetic wherever an
// entry sits in a tile): within a group of equal centroids the selection is a prefix in id order.
// Float32: the selection equals the reference exactly; 16-bit: up to the tolerance.
TEST(GpuLookup, TiesBreakByAscendingId) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 64, kPt = 4;
  std::vector<Head> heads(1);
  MakeHead(rng, 400, kD, kPt, 9, 0, &heads[0]);
  HeadIndex& x = heads[0].x;
  // Clusters 8k..8k+7 share the centroid of 8k.
  for (int c = 0; c < x.num_clusters(); ++c) {
    std::copy_n(x.centroids.begin() + (c / 8 * 8) * kD, kD, x.centroids.begin() + c * kD);
  }
  UploadCentroids(&heads[0]);
  std::vector<Seg> segs;
  for (int rows : {3, 40}) {
    for (double f : {0.013, 0.05, 0.11, 0.37}) {
      segs.push_back(MakeSeg(rng, heads[0], 0, rows, RefMode::kBudget, f));
    }
  }
  for (bool f16 : {true, false}) {
    std::vector<Out> out;
    RunLookup(heads, segs, kD, kPt, &out, false, f16);
    for (size_t i = 0; i < segs.size(); ++i) {
      const RefSelection ref = RefSelect(x, segs[i].q.data(), segs[i].rows, RefMode::kBudget,
                                         segs[i].budget, 0, 0, kTieTol);
      if (!f16) {
        EXPECT_EQ(out[i].clusters, ref.clusters) << "segment " << i;  // exact ties both sides
        continue;
      }
      CheckAll(heads, {segs[i]}, {out[i]}, true, "TiesBreakByAscendingId");
      std::vector<uint8_t> sel(x.num_clusters(), 0);
      for (int32_t c : out[i].clusters) sel[c] = 1;
      for (int c = 1; c < x.num_clusters(); ++c) {
        if (c % 8 == 0) continue;
        EXPECT_LE(sel[c], sel[c - 1]) << "segment " << i << " cluster " << c;
      }
    }
  }
}

// The tie tests' launches over head 0: one with a 16-row segment and one of narrow segments alone
// (the selection's four-row variant), each a budget segment per row count and keep fraction.
std::vector<std::vector<Seg>> TieLaunches(std::mt19937_64& rng, const Head& h,
                                          std::initializer_list<double> fractions) {
  std::vector<std::vector<Seg>> launches;
  for (const auto& row_set : {std::vector<int>{1, 4, 16}, std::vector<int>{1, 4}}) {
    std::vector<Seg>& segs = launches.emplace_back();
    for (int rows : row_set) {
      for (double f : fractions) segs.push_back(MakeSeg(rng, h, 0, rows, RefMode::kBudget, f));
    }
  }
  return launches;
}

// Every centroid equal: every score ties, so a budget keeps the lowest ids until it is met. With
// thousands of clusters the tied run crosses many scoring tiles and the selection's per-thread
// runs (the tie counts before each come from block scans), on both centroid storages; 5,000 of
// them, so the narrow launch takes the selection's four-entry score groups (over 4,096 entries).
TEST(GpuLookup, TiesAcrossTilesKeepLowestIds) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(1);
  MakeHead(rng, 5000, kD, kPt, 30, 0, &heads[0]);
  HeadIndex& x = heads[0].x;
  for (int c = 1; c < x.num_clusters(); ++c) {
    std::copy_n(x.centroids.begin(), kD, x.centroids.begin() + c * kD);
  }
  UploadCentroids(&heads[0]);
  for (const std::vector<Seg>& segs : TieLaunches(rng, heads[0], {0.013, 0.3, 0.77})) {
    for (bool f16 : {true, false}) {
      std::vector<Out> out;
      RunLookup(heads, segs, kD, kPt, &out, /*repeat=*/true, f16);
      for (size_t i = 0; i < segs.size(); ++i) {
        std::vector<int32_t> want;
        int tokens = 0;
        for (int c = 0; c < x.num_clusters() && tokens < segs[i].budget; ++c) {
          want.push_back(c);
          tokens += x.cluster_size[c];
        }
        EXPECT_EQ(out[i].clusters, want) << "segment " << i << (f16 ? " f16" : " f32");
        EXPECT_EQ(out[i].tokens, tokens) << "segment " << i;
      }
    }
  }
}

// Two thirds of the clusters share one centroid, the rest are distinct: whenever the cut falls
// among the tied ones, the bin of its first radix digit holds far more entries than the selection
// ranks directly (kCutCandidates), so the remaining radix passes decide it. A keep fraction of
// 0.5 always cuts inside the tied run (the distinct clusters hold about a third of the tokens).
TEST(GpuLookup, CrowdedCutBinKeepsLowestTiedIds) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16, kFirstTied = 1700;
  std::vector<Head> heads(1);
  MakeHead(rng, 5100, kD, kPt, 30, 0, &heads[0]);
  HeadIndex& x = heads[0].x;
  for (int c = kFirstTied + 1; c < x.num_clusters(); ++c) {
    std::copy_n(x.centroids.begin() + kFirstTied * kD, kD, x.centroids.begin() + c * kD);
  }
  UploadCentroids(&heads[0]);
  for (const std::vector<Seg>& segs : TieLaunches(rng, heads[0], {0.1, 0.5, 0.8})) {
    for (bool f16 : {true, false}) {
      const std::vector<Out> out = RunAndCheck(heads, segs, kD, kPt, /*repeat=*/false, f16,
                                               "CrowdedCutBinKeepsLowestTiedIds");
      for (size_t i = 0; i < segs.size(); ++i) {
        std::vector<uint8_t> sel(x.num_clusters(), 0);
        for (int32_t c : out[i].clusters) sel[c] = 1;
        int tied = sel[kFirstTied];
        for (int c = kFirstTied + 1; c < x.num_clusters(); ++c) {
          EXPECT_LE(sel[c], sel[c - 1]) << "segment " << i << " cluster " << c;
          tied += sel[c];
        }
        if (i % 3 == 1) {  // keep 0.5: the cut lies inside the tied run
          EXPECT_GT(tied, 0) << "segment " << i;
          EXPECT_LT(tied, x.num_clusters() - kFirstTied) << "segment " << i;
        }
      }
    }
  }
}

TEST(GpuLookup, ManySegmentsMixingContexts) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(6);
  for (int i = 0; i < 6; ++i) MakeHead(rng, 100 + 350 * i, kD, kPt, 48, 0, &heads[i]);
  std::uniform_int_distribution<int> head(0, 5), mode(0, 9);
  std::uniform_real_distribution<double> frac(0.0, 0.5);
  const int rows[] = {1, 2, 4, 8, 16, 32, 4, 4};
  std::vector<Seg> segs;
  for (int i = 0; i < 48; ++i) {
    const int h = head(rng);
    const int m = mode(rng);
    const RefMode rm = m == 0 ? RefMode::kDense : RefMode::kBudget;
    segs.push_back(MakeSeg(rng, heads[h], h, rows[i % 8], rm, frac(rng)));
  }
  for (bool f16 : {true, false}) {
    RunAndCheck(heads, segs, kD, kPt, /*repeat=*/true, f16);
  }
}

TEST(GpuLookup, HierarchicalMatchesReference) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(3);
  MakeHead(rng, 600, kD, kPt, 30, 30, &heads[0]);
  MakeHead(rng, 2000, kD, kPt, 30, 64, &heads[1]);
  MakeHead(rng, 50, kD, kPt, 30, 50, &heads[2]);  // one child per parent
  std::vector<Seg> segs;
  for (int h = 0; h < 3; ++h) {
    for (int rows : {1, 4, 16, 100}) {
      for (double f : {0.02, 0.1, 0.25}) {
        segs.push_back(MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, f));
      }
      Seg s = MakeSeg(rng, heads[h], h, rows, RefMode::kThreshold, 0.1);
      s.threshold = 1.f / heads[h].x.tokens;  // about the mean per-key score
      segs.push_back(s);
      segs.push_back(MakeSeg(rng, heads[h], h, rows, RefMode::kDense, 0.1));
      Seg all = MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, 0.2);
      all.l1_budget = heads[h].x.tokens;  // every parent stays: the single-level selection
      segs.push_back(all);
      Seg none = MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, 0.0);
      segs.push_back(none);
    }
  }
  for (bool f16 : {true, false}) {
    RunAndCheck(heads, segs, kD, kPt, /*repeat=*/true, f16);
  }
}

// The sizes of the benchmarks: 128K tokens at 5% centroids, decode and prefill rows; both
// centroid storages.
TEST(GpuLookup, ContextSizedIndex) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(1);
  MakeHead(rng, 6554, kD, kPt, 39, 0, &heads[0]);
  std::vector<Seg> segs;
  segs.push_back(MakeSeg(rng, heads[0], 0, 4, RefMode::kBudget, 0.05));
  segs.push_back(MakeSeg(rng, heads[0], 0, 4096, RefMode::kBudget, 0.05));
  for (bool f16 : {true, false}) {
    RunAndCheck(heads, segs, kD, kPt, /*repeat=*/false, f16);
  }
}

// The prefill paths (tensor cores for 16-bit centroids, fp32 tiles for float32): flat and
// two-level, budget and threshold, head_dim 64 and 128, ragged row and entry counts.
TEST(GpuLookup, TiledVariantsMatchReference) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  for (int d : {64, 128}) {
    std::vector<Head> heads(3);
    MakeHead(rng, 1000 + 37 * (d / 64), d, 16, 40, 0, &heads[0]);
    MakeHead(rng, 130, d, 16, 40, 0, &heads[1]);
    MakeHead(rng, 1500, d, 16, 40, 48, &heads[2]);
    std::vector<Seg> segs;
    for (int h = 0; h < 3; ++h) {
      for (int rows : {17, 64, 100, 333, 2048}) {
        segs.push_back(MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, 0.03 + 0.01 * h));
      }
      Seg s = MakeSeg(rng, heads[h], h, 200, RefMode::kThreshold, 0.1);
      s.threshold = 1.f / heads[h].x.tokens;
      segs.push_back(s);
    }
    for (bool f16 : {true, false}) {
      SCOPED_TRACE("d " + std::to_string(d));
      RunAndCheck(heads, segs, d, 16, /*repeat=*/true, f16);
    }
  }
}

// The 16-bit prefill passes cut their streamed dimension into pieces (entries in pass 1, query
// rows in pass 2; PlanLookup picks the lengths from the launch and the device) whose partial
// statistics and column sums the last block of a tile combines: flat and two-level indexes,
// ragged last pieces. Few row tiles over many entries, and few entry tiles over many rows, make
// the plan cut both passes into several pieces for any device from 16 to 500 SMs.
TEST(GpuLookup, SplitTensorPassesMatchReference) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(3);
  MakeHead(rng, 4397, kD, kPt, 40, 0, &heads[0]);
  MakeHead(rng, 2603, kD, kPt, 40, 45, &heads[1]);
  MakeHead(rng, 150, kD, kPt, 40, 0, &heads[2]);
  const std::vector<std::vector<int>> rows_of = {{130, 1114}, {130, 2055}, {3000}};
  std::vector<Seg> segs;
  for (int h = 0; h < 3; ++h) {
    for (int rows : rows_of[h]) {
      for (double f : {0.03, 0.2}) {
        segs.push_back(MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, f));
      }
    }
  }
  std::vector<Out> out;
  RunLookup(heads, segs, kD, kPt, &out, /*repeat=*/true, /*f16=*/true);
  int most_row_splits = 0, most_col_splits = 0;
  for (const Out& o : out) {
    most_row_splits = std::max(most_row_splits, o.row_splits);
    most_col_splits = std::max(most_col_splits, o.col_splits);
  }
  EXPECT_GT(most_row_splits, 1) << "pass 1 ran in one piece per tile";
  EXPECT_GT(most_col_splits, 1) << "pass 2 ran in one piece per tile";
  CheckAll(heads, segs, out, true);
}

// Head dims the kernels pad (16, 48, 96: k-steps and lanes past head_dim read as zero) and the
// largest (256: a whole warp per centroid, 16 k-steps), small and large paths.
TEST(GpuLookup, HeadDimsUpTo256) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  for (int d : {16, 48, 96, 256}) {
    SCOPED_TRACE("d " + std::to_string(d));
    std::vector<Head> heads(2);
    MakeHead(rng, 700, d, 16, 40, 0, &heads[0]);
    MakeHead(rng, 300, d, 16, 40, 20, &heads[1]);
    std::vector<Seg> segs;
    for (int h = 0; h < 2; ++h) {
      for (int rows : {1, 4, 9, 40, 700}) {
        segs.push_back(MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, 0.1));
      }
    }
    for (bool f16 : {true, false}) {
      RunAndCheck(heads, segs, d, 16, /*repeat=*/true, f16);
    }
  }
}

// The small path's tensor-core variant (every small segment of the launch with at most
// kLookupNarrowRows rows; float32 centroids run the same segments through FMA): head dims it pads
// (16, 48, 96: chunks past head_dim read as zero) and fills (64, 128), one to kLookupNarrowRows
// rows (columns past the rows zero), entry counts that end mid-warp and a head of fewer centroids
// than one warp's 16, and enough segments that a block of the persistent grid scores several
// tiles of its segment, the number odd or even. Flat heads alone (the staged selection), then with
// a two-level head (level-2 entries through the candidate list; the last-block selection).
TEST(GpuLookup, NarrowRowsAcrossHeadDims) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kPt = 16;
  std::uniform_real_distribution<double> frac(0.01, 0.3);
  for (int d : {16, 48, 64, 96, 128}) {
    SCOPED_TRACE("d " + std::to_string(d));
    std::vector<Head> heads(3);
    MakeHead(rng, 5000 + 37 * (d / 16), d, kPt, 40, 0, &heads[0]);
    MakeHead(rng, 9, d, kPt, 40, 0, &heads[1]);
    MakeHead(rng, 1203, d, kPt, 40, 40, &heads[2]);
    for (int num_heads : {2, 3}) {
      SCOPED_TRACE(num_heads == 2 ? "flat" : "with two-level");
      std::vector<Seg> segs;
      for (int i = 0; i < 60; ++i) {
        const int h = i % num_heads;
        const int rows = 1 + i % kLookupNarrowRows;
        const RefMode mode = i % 5 == 4 ? RefMode::kThreshold : RefMode::kBudget;
        Seg s = MakeSeg(rng, heads[h], h, rows, mode, frac(rng));
        if (mode == RefMode::kThreshold) s.threshold = 1.f / heads[h].x.tokens;
        segs.push_back(s);
      }
      for (bool f16 : {true, false}) {
        RunAndCheck(heads, segs, d, kPt, /*repeat=*/true, f16);
      }
    }
  }
}

// The staged selection of a 128K-token context's 6,554 clusters and of 11,500 (twelve entries a
// thread in the emission; 180 KB of the 16 bytes a cluster in shared memory on the H200): budget
// cuts at one to four rows must match the reference and the global-memory selection.
TEST(GpuLookup, StagedSelectionAtLargeSegments) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 64, kPt = 16;
  std::vector<Head> heads(2);
  MakeHead(rng, 11500, kD, kPt, 40, 0, &heads[0]);
  MakeHead(rng, 6554, kD, kPt, 40, 0, &heads[1]);
  std::uniform_real_distribution<double> frac(0.01, 0.3);
  for (int h : {0, 1}) {
    SCOPED_TRACE(std::to_string(heads[h].x.num_clusters()) + " clusters");
    std::vector<Seg> segs;
    for (int i = 0; i < 4; ++i) {
      segs.push_back(MakeSeg(rng, heads[h], h, 1 + i, RefMode::kBudget, frac(rng)));
    }
    RunAndCheck(heads, segs, kD, kPt, /*repeat=*/true, /*f16=*/true);
  }
}

// Clustered synthetic data: centroids gathered tightly around a few topics, queries near one of
// them, so the cut falls among many nearly equal scores (the hard case for 16-bit arithmetic).
// Reports the mismatch rate next to the random-data tests'.
TEST(GpuLookup, ClusteredDataWithinBound) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  for (float spread : {0.02f, 0.1f}) {
    std::vector<Head> heads(2);
    std::vector<std::vector<float>> topics(2);
    std::vector<Seg> segs;
    for (int h = 0; h < 2; ++h) {
      heads[h].x = testing::MakeClusteredIndex(rng, 3000, kD, kPt, 39, 16, spread, &topics[h]);
      heads[h].table.resize(heads[h].x.num_pages());
      std::iota(heads[h].table.begin(), heads[h].table.end(), 0);
      SetUpHead(&heads[h]);
      for (int rows : {1, 4, 16, 64, 1024}) {
        for (double f : {0.05, 0.1, 0.3}) {
          Seg sg;
          sg.head = h;
          sg.rows = rows;
          sg.q = testing::QueriesNearTopic(rng, topics[h], kD, rows);
          sg.budget = Target(f, heads[h].x.tokens);
          segs.push_back(sg);
        }
      }
    }
    for (bool f16 : {true, false}) {
      std::vector<Out> out;
      RunLookup(heads, segs, kD, kPt, &out, false, f16);
      CheckAll(heads, segs, out, f16,
               spread < 0.05f ? "ClusteredData spread 0.02" : "ClusteredData spread 0.1");
    }
  }
}

// Magnitudes binary16 cannot hold directly (centroids near 1e6 and 1e-6, queries near 1e4): the
// per-head and per-row power-of-two scales keep them exact up to rounding.
TEST(GpuLookup, LargeAndSmallMagnitudes) {
  SKIP_WITHOUT_DEVICE();
  std::mt19937_64 rng(testing::FreshSeed());
  constexpr int kD = 128, kPt = 16;
  std::vector<Head> heads(2);
  for (int h = 0; h < 2; ++h) {
    heads[h].x = SyntheticIndex(rng, 900, kD, kPt, 30);
    const float m = h == 0 ? 1e6f : 1e-6f;
    for (float& v : heads[h].x.centroids) v *= m;
    heads[h].table.resize(heads[h].x.num_pages());
    std::iota(heads[h].table.begin(), heads[h].table.end(), 0);
    SetUpHead(&heads[h]);
  }
  std::vector<Seg> segs;
  for (int h = 0; h < 2; ++h) {
    for (int rows : {4, 300}) {
      Seg sg = MakeSeg(rng, heads[h], h, rows, RefMode::kBudget, 0.1);
      // Logits of order 1: q scaled against the centroids' magnitude.
      const float qm = h == 0 ? 1e-6f : 1e4f;
      for (float& v : sg.q) v *= qm;
      segs.push_back(sg);
    }
  }
  RunAndCheck(heads, segs, kD, kPt, /*repeat=*/false, true);
}

TEST(GpuLookup, CentroidScaleF16) {
  // The scale is a power of two that puts the largest |c| in [2^14, 2^15); values round to
  // nearest with 11 significant bits.
  std::mt19937_64 rng(testing::FreshSeed());
  for (float m : {1e-30f, 3e-5f, 1.f, 1.7f, 6e4f, 1e6f, 1e37f}) {
    std::vector<float> c = testing::RandomNormal(512, rng);
    float max_abs = 0;
    for (float& v : c) v *= m;
    for (float v : c) max_abs = std::max(max_abs, std::abs(v));
    std::vector<uint16_t> h, none;
    const float scale = CentroidsToF16(c, {}, &h, &none);
    int ex = 0;
    EXPECT_EQ(std::frexp(scale, &ex), 0.5f) << "scale " << scale << " is not a power of two";
    EXPECT_GE(max_abs / scale, 16384.f);
    EXPECT_LT(max_abs / scale, 32768.f);
    for (size_t i = 0; i < c.size(); ++i) {
      const double back = static_cast<double>(HalfToFloat(h[i])) * scale;
      // Relative 2^-11 for normal binary16 values; absolute 2^-25 · scale below 2^-14 · scale.
      EXPECT_LE(std::abs(back - c[i]),
                std::max(std::ldexp(std::abs(static_cast<double>(c[i])), -11),
                         std::ldexp(static_cast<double>(scale), -25)))
          << "value " << c[i] << " scale " << scale;
    }
  }
  EXPECT_EQ(CentroidScaleF16(0.f), 1.f);
}

// Host arithmetic only: runs without a device too.
TEST(GpuLookup, BudgetPageBoundIsAnUpperBound) {
  std::mt19937_64 rng(testing::FreshSeed());
  for (int trial = 0; trial < 200; ++trial) {
    const int pt = 1 << (trial % 6);
    const HeadIndex x = SyntheticIndex(rng, 1 + trial, 16, pt, 1 + trial % 50);
    std::vector<int32_t> sorted = x.cluster_size;
    std::sort(sorted.begin(), sorted.end());
    std::vector<double> s(x.num_clusters());
    for (double& v : s) v = std::uniform_real_distribution<double>(0, 1)(rng);
    const int budget = std::uniform_int_distribution<int>(1, x.tokens)(rng);
    RefSelection sel;
    std::vector<int32_t> ids(x.num_clusters());
    std::iota(ids.begin(), ids.end(), 0);
    testing::RefPick(x, ids, s, RefMode::kBudget, budget, 0, &sel);
    int pages = 0;
    for (int32_t c : sel.clusters) pages += x.cluster_page_begin[c + 1] - x.cluster_page_begin[c];
    EXPECT_LE(pages, BudgetPageBound(sorted, budget, pt, x.num_pages()));
  }
}

// Pass 2's pieces as the kernel cuts a segment of `stages` · 64 rows (PieceRangeFirst): the first
// piece `first` stages, the rest in equal runs of whole stages, the last ones possibly shorter or
// empty. Stages per piece.
std::vector<int64_t> KernelColPieces(int64_t stages, int64_t splits, int64_t first) {
  std::vector<int64_t> out;
  if (splits <= 1) return {stages};
  out.push_back(first);
  const int64_t rest = (stages - first) * 64;
  const int64_t per = (rest + (splits - 1) - 1) / (splits - 1);
  const int64_t per_rows = (per + 63) / 64 * 64;
  for (int64_t p = 1; p < splits; ++p) {
    const int64_t begin = std::min(rest, (p - 1) * per_rows);
    const int64_t end = std::min(rest, begin + per_rows);
    out.push_back((end - begin) / 64);
  }
  return out;
}

// Pass 2 simulated block by block: grid order (piece, segment, tile), each block to the slot
// that frees first, costing its stages + 3.
int64_t BlockByBlockEnd(const std::vector<ColPassRun>& runs, int64_t slots, ColPieces pc) {
  std::priority_queue<int64_t, std::vector<int64_t>, std::greater<int64_t>> free_at;
  for (int64_t i = 0; i < slots; ++i) free_at.push(0);
  int64_t end = 0;
  for (int64_t p = 0; p < pc.splits; ++p) {
    for (const ColPassRun& r : runs) {
      const int64_t k = std::min(pc.splits, r.stages);
      if (p >= k) continue;
      const int64_t cost = KernelColPieces(r.stages, k, ColFirstStages(r.stages, k, pc.q))[p] + 3;
      for (int64_t b = 0; b < r.count * r.tiles; ++b) {
        const int64_t t = free_at.top() + cost;
        free_at.pop();
        free_at.push(t);
        end = std::max(end, t);
      }
    }
  }
  return end;
}

// The host's plan of pass 2's pieces (ChooseColPieces, used on sm_90): its pieces are the ones the
// kernel cuts and cover the rows, its grouped schedule simulation agrees with a block-by-block one,
// and its choice is never worse than equal pieces in that simulation, and better at the
// benchmark's 128K prefill shape (where equal pieces leave the last wave part-empty).
TEST(GpuLookup, ColumnPiecesLongestFirst) {
  for (int64_t stages = 1; stages <= 80; ++stages) {
    for (int64_t k = 1; k <= std::min<int64_t>(kMaxColSplits, stages); ++k) {
      for (int64_t q = (64 + k - 1) / k; q <= 64; ++q) {
        const int64_t first = ColFirstStages(stages, k, q);
        const std::vector<int64_t> cut = KernelColPieces(stages, k, first);
        int64_t sum = 0;
        for (int64_t p = 0; p < k; ++p) {
          EXPECT_EQ(ColPieceStages(stages, k, first, p), cut[p]) << stages << " " << k << " " << q;
          EXPECT_LE(cut[p], cut[0]);
          sum += cut[p];
        }
        EXPECT_EQ(sum, stages);
        if (k > 1) {
          EXPECT_GE(first * k, stages);
          EXPECT_LE(first, stages - (k - 1));
        }
      }
    }
  }
  std::mt19937_64 rng(testing::FreshSeed());
  auto uni = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<ColPassRun> runs(uni(1, 3));
    for (ColPassRun& r : runs) r = {uni(1, 60), uni(1, 70), uni(1, 8)};
    const int64_t slots = std::vector<int64_t>{1, 7, 132, 264}[trial % 4];
    const int64_t k = uni(1, kMaxColSplits);
    const ColPieces any{k, uni((64 + k - 1) / k, 64)};
    ASSERT_EQ(ColPassEnd(runs, slots, any), BlockByBlockEnd(runs, slots, any)) << trial;
    const int64_t chosen = BlockByBlockEnd(runs, slots, ChooseColPieces(runs, slots));
    for (int64_t e = 1; e <= kMaxColSplits; ++e) {
      EXPECT_LE(chosen, BlockByBlockEnd(runs, slots, {e, (64 + e - 1) / e})) << trial;
    }
  }
  // 128K prefill on an H200: 8 kv heads × 52 entry tiles, 4,096 rows (64 stages), 264 slots.
  const std::vector<ColPassRun> bench = {{52, 64, 8}};
  int64_t best_equal = std::numeric_limits<int64_t>::max();
  for (int64_t e = 1; e <= kMaxColSplits; ++e) {
    best_equal = std::min(best_equal, BlockByBlockEnd(bench, 264, {e, (64 + e - 1) / e}));
  }
  const ColPieces chosen = ChooseColPieces(bench, 264);
  EXPECT_LT(BlockByBlockEnd(bench, 264, chosen), best_equal);
  EXPECT_GT(chosen.splits, 1);
  // Few entry tiles over many rows (2 tiles, 65,536 rows): many pieces, as many blocks as slots.
  const std::vector<ColPassRun> narrow = {{2, 1024, 1}};
  const ColPieces many = ChooseColPieces(narrow, 264);
  EXPECT_GT(many.splits, kUnequalColSplits);
  EXPECT_LT(BlockByBlockEnd(narrow, 264, many), BlockByBlockEnd(narrow, 264, {8, 8}) / 4);
  // The plan's cost on the host (a metric only): one and eight 128K prefill requests, 8 kv heads.
  for (int64_t segs : {8, 64}) {
    const auto t0 = std::chrono::steady_clock::now();
    const ColPieces c = ChooseColPieces({{52, 64, segs}}, 264);
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ metric ] ChooseColPieces, %lld segments x 52 tiles: %.0f us (%lld pieces)\n",
                static_cast<long long>(segs), us, static_cast<long long>(c.splits));
  }
}

// A keep-budget segment over placeholder arrays for the host-only plan tests: `clusters` clusters
// of 20 tokens, `rows` query rows, a random budget; centroids at `centroids` (never read).
LookupSegment PlanOnlySegment(std::mt19937_64& rng, const uint16_t* centroids, int32_t clusters,
                              int32_t rows) {
  static const int32_t kPlaceholder[1] = {0};
  LookupSegment s;
  s.centroids_f16 = centroids;
  s.cluster_size = kPlaceholder;
  s.cluster_page_begin = kPlaceholder;
  s.page_table = kPlaceholder;
  s.num_clusters = clusters;
  s.tokens = 20 * clusters;
  s.rows = rows;
  s.mode = LookupMode::kBudget;
  s.budget = 1 + static_cast<int32_t>(rng() % s.tokens);
  s.page_capacity = 2 * clusters;
  return s;
}

// Host only: the workspace regions PlanLookup gives small segments. The staged selection reads a
// logit row four entries at a time from tiles * 128 floats apart (LogitStride), up to the entry
// count rounded up to four, so every row must start 16-byte aligned, hold the tiles' entries, and
// no region may overlap another segment's or the scores and tile statistics.
TEST(GpuLookup, SmallSegmentRegionsAlignedAndDisjoint) {
  std::mt19937_64 rng(testing::FreshSeed());
  const uint16_t centroids[1] = {0};
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<LookupSegment> segs(1 + rng() % 12);
    for (LookupSegment& s : segs) {
      const auto clusters = 1 + static_cast<int32_t>(rng() % 9000);
      const auto rows = 1 + static_cast<int32_t>(rng() % kLookupSmallRows);
      s = PlanOnlySegment(rng, centroids, clusters, rows);
    }
    LookupLayout layout;
    const Status st = PlanLookup(128, &segs, &layout);
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<std::pair<int64_t, int64_t>> regions;  // [begin, end) in floats
    for (const LookupSegment& s : segs) {
      ASSERT_EQ(s.large, 0);
      ASSERT_GE(s.tiles * 128, s.entry_capacity);
      ASSERT_EQ(s.tiles, (s.entry_capacity + 127) / 128);
      EXPECT_EQ(s.logit_offset % 4, 0) << "logit rows must start 16-byte aligned";
      regions.emplace_back(s.logit_offset, s.logit_offset + int64_t{s.rows} * s.tiles * 128);
      regions.emplace_back(s.score_offset, s.score_offset + s.entry_capacity);
      regions.emplace_back(s.tstat_offset, s.tstat_offset + int64_t{s.rows} * s.tiles * 2);
    }
    std::sort(regions.begin(), regions.end());
    for (size_t i = 0; i < regions.size(); ++i) {
      EXPECT_GE(regions[i].first, 0);
      EXPECT_LE(regions[i].second, static_cast<int64_t>(layout.float_words)) << trial;
      if (i > 0) {
        EXPECT_LE(regions[i - 1].second, regions[i].first) << "overlap, trial " << trial;
      }
    }
  }
}

// Host only: the descriptors PlanLookup gives the decode scorer's launch parameters
// (SmallScoreDesc): one per small-list entry, in its order, with the fields of that segment and
// total = its clusters when scored flat, 0 when fixed (keep nothing or everything: unscored);
// none at all when a segment is two-level (those launches read the segments from memory).
TEST(GpuLookup, SmallScoreDescsFollowTheSmallList) {
  std::mt19937_64 rng(testing::FreshSeed());
  const int32_t placeholder[1] = {0};
  const uint16_t centroids[12] = {};  // segment i's at centroids + i: the order is checked
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<LookupSegment> segs(1 + rng() % 12);
    const bool two_level = trial % 5 == 4;
    for (size_t i = 0; i < segs.size(); ++i) {
      const auto clusters = 40 + static_cast<int32_t>(rng() % 9000);
      const auto rows = 1 + static_cast<int32_t>(rng() % 1200);  // some large (prefill) segments
      LookupSegment& s = segs[i];
      s = PlanOnlySegment(rng, centroids + i, clusters, rows);
      s.q_row = static_cast<int32_t>(rng() % 1000);
      s.centroid_scale = 0.5f + static_cast<float>(rng() % 100);
      const int m = static_cast<int>(rng() % 4);
      if (m == 3) s.mode = LookupMode::kDense;
      if (m == 2) s.budget = 0;  // keep nothing
    }
    if (two_level) {
      LookupSegment& s = segs[rng() % segs.size()];
      s.num_l1 = 20;
      s.l1_centroids_f16 = centroids;
      s.l1_size = placeholder;
      s.l1_child_begin = placeholder;
      s.l1_budget = s.tokens / 2;
    }
    LookupLayout layout;
    const Status st = PlanLookup(128, &segs, &layout);
    ASSERT_TRUE(st.ok()) << st.ToString();
    if (layout.any_hierarchical) {
      EXPECT_TRUE(layout.small_descs.empty()) << trial;
      continue;
    }
    ASSERT_EQ(layout.small_descs.size(), layout.small_list.size()) << trial;
    for (size_t k = 0; k < layout.small_list.size(); ++k) {
      const LookupSegment& s = segs[layout.small_list[k]];
      const SmallScoreDesc& d = layout.small_descs[k];
      EXPECT_EQ(d.centroids, static_cast<const void*>(s.centroids_f16));
      EXPECT_EQ(d.cluster_size, s.cluster_size);
      EXPECT_EQ(d.total, s.run == LookupRun::kFlat ? s.num_clusters : 0) << trial;
      if (s.run == LookupRun::kFixed) continue;  // no workspace regions
      EXPECT_EQ(d.logit_offset, s.logit_offset);
      EXPECT_EQ(d.tstat_offset, s.tstat_offset);
      EXPECT_EQ(d.rows, s.rows);
      EXPECT_EQ(d.q_row, s.q_row);
      EXPECT_EQ(d.tiles, s.tiles);
      EXPECT_EQ(d.centroid_scale, s.centroid_scale);
    }
  }
}

TEST(GpuLookup, RejectsMalformedPlans) {
  SKIP_WITHOUT_DEVICE();
  std::vector<LookupSegment> segs(1);
  LookupLayout layout;
  EXPECT_TRUE(PlanLookup(100, &segs, &layout).IsInvalidArgument());  // head_dim
  EXPECT_TRUE(PlanLookup(272, &segs, &layout).IsInvalidArgument());  // head_dim > 256
  EXPECT_TRUE(PlanLookup(128, &segs, &layout).IsInvalidArgument());  // empty segment
}

}  // namespace
}  // namespace sqkv::gpu
