// Checks shared by the Store's tests on the CPU and on the GPU (header only: the testing library
// itself does not link the api module).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "api/store.h"
#include "api/synthetic.h"
#include "tests/testing/testing.h"

namespace sqkv::testing {

// Writes a synthetic context to `path` and imports it into `store` as `name`; returns its layer-0
// user queries (q_heads, n, head_dim). A failure is a test failure (the queries may be empty).
inline std::vector<float> ImportSyntheticContext(Store* store, const std::string& path,
                                                 const std::string& name,
                                                 const SyntheticOptions& so,
                                                 const ImportOptions& io = ImportOptions()) {
  std::vector<float> q;
  EXPECT_TRUE(WriteSyntheticContext(so, path, &q).ok());
  const Status s = store->Import(name, path, io, nullptr);
  EXPECT_TRUE(s.ok()) << name << ": " << s.ToString();
  return q;
}

// The defaults suit answers computed in float32 from the stored values (the CPU path).
struct ReferenceTolerance {
  double out_rel = 1e-5;  // ‖out − ref‖ / ‖ref‖ per kv head
  double lse_abs = 1e-4;  // |lse − ref| ≤ lse_abs + lse_rel · |ref|
  double lse_rel = 1e-4;
};

// A query's answer (run with QueryOptions::want_selection) against float64 attention over exactly
// the tokens it reports as selected, kv head by kv head: the rows of head h's query-head group
// attend over keys[h] at those tokens. q: (q_heads, n, d); keys, values: one layer, (kv_heads,
// tokens, d). So an answer is checked whether or not its selection equals another path's.
inline void ExpectMatchesReferenceOverSelection(const QueryResult& r, const float* q, int q_heads,
                                                int n, int d, const float* keys,
                                                const float* values, int kv_heads, int tokens,
                                                const ReferenceTolerance& tol,
                                                const std::string& what) {
  ASSERT_EQ(r.selected_tokens.size(), static_cast<size_t>(kv_heads)) << what;
  const size_t rows = static_cast<size_t>(q_heads / kv_heads) * n;
  const size_t head = static_cast<size_t>(tokens) * d;
  for (int h = 0; h < kv_heads; ++h) {
    std::vector<double> ref_out, ref_lse;
    ReferenceAttention(q + h * rows * d, static_cast<int>(rows), d, keys + h * head,
                       values + h * head, r.selected_tokens[h], 1.0 / std::sqrt(d), &ref_out,
                       &ref_lse);
    EXPECT_LT(RelativeError(r.output.data() + h * rows * d, ref_out.data(), rows * d), tol.out_rel)
        << what << ", kv head " << h;
    for (size_t i = 0; i < rows; ++i) {
      EXPECT_NEAR(r.lse[h * rows + i], ref_lse[i], tol.lse_abs + tol.lse_rel * std::abs(ref_lse[i]))
          << what << ", kv head " << h << ", row " << i;
    }
  }
}

}  // namespace sqkv::testing
