// Helpers for the GPU engine tests (engine_test.cc, engine_paging_test.cc): a synthetic layer of
// one context (indexes and the pages they describe), an engine, and requests with fresh queries
// and poisoned outputs.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "gpu/engine.h"
#include "index/head_index.h"
#include "index/select.h"
#include "tests/gpu/lookup_testing.h"
#include "tests/testing/testing.h"

namespace sqkv::gpu::engine_testing {

// One layer of one context: per-head indexes and the head-major pages they describe.
struct Context {
  DType dtype = DType::kBF16;
  int page_tokens = 16;
  int head_dim = 128;
  std::vector<HeadIndex> heads;
  std::vector<uint8_t> pages;  // head-major
  std::vector<size_t> head_page_base;
  size_t page_bytes() const { return PageBytes(page_tokens, head_dim, dtype); }
};

inline Context MakeContext(std::mt19937_64& rng, int kv_heads, int clusters, int d, int pt,
                           DType dtype, int num_l1 = 0) {
  Context c;
  c.dtype = dtype;
  c.page_tokens = pt;
  c.head_dim = d;
  const size_t pb = c.page_bytes();
  const size_t block = static_cast<size_t>(pt) * d;
  for (int h = 0; h < kv_heads; ++h) {
    c.heads.push_back(testing::SyntheticIndex(rng, clusters, d, pt, 40, num_l1));
    const HeadIndex& x = c.heads.back();
    c.head_page_base.push_back(c.pages.size() / pb);
    const size_t at = c.pages.size();
    c.pages.resize(at + x.num_pages() * pb, 0);
    for (int p = 0; p < x.num_pages(); ++p) {
      std::vector<float> k = testing::RandomNormal(block, rng);
      std::vector<float> v = testing::RandomNormal(block, rng);
      for (int t = 0; t < pt; ++t) {
        if (x.positions[static_cast<size_t>(p) * pt + t] < 0) {  // padding stays zero
          std::fill_n(k.begin() + t * d, d, 0.f);
          std::fill_n(v.begin() + t * d, d, 0.f);
        }
      }
      uint8_t* page = c.pages.data() + at + p * pb;
      FromFloat(dtype, k.data(), page, block);
      FromFloat(dtype, v.data(), page + pb / 2, block);
    }
  }
  return c;
}

inline std::unique_ptr<Engine> MakeEngine(
    size_t pool_bytes = 128ull << 20, EngineOptions::Upload upload = EngineOptions::Upload::kAuto) {
  EngineOptions o;
  o.pool_bytes = pool_bytes;
  o.upload = upload;
  std::unique_ptr<Engine> e;
  Status st = Engine::Create(o, &e);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return e;
}

// A request with fresh q and poisoned outputs.
struct Req {
  uint64_t key = 0;
  const Context* ctx = nullptr;
  int q_heads = 0, n = 0;
  SelectOptions select;
  std::vector<float> q, out, lse;
  std::vector<HeadSelection> selection;
};

inline SelectOptions Budget(float f) {
  SelectOptions o;
  o.keep_fraction = f;
  return o;
}

inline Req MakeReq(std::mt19937_64& rng, const Context& c, uint64_t key, int g, int n,
                   SelectOptions select) {
  Req r;
  r.key = key;
  r.ctx = &c;
  r.q_heads = g * static_cast<int>(c.heads.size());
  r.n = n;
  r.select = select;
  const size_t rows = static_cast<size_t>(r.q_heads) * n;
  r.q = testing::RandomNormal(rows * c.head_dim, rng, 1.5f);
  r.out.assign(rows * c.head_dim, std::numeric_limits<float>::quiet_NaN());
  r.lse.assign(rows, std::numeric_limits<float>::quiet_NaN());
  return r;
}

}  // namespace sqkv::gpu::engine_testing
