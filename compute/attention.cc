#include "compute/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/dot.h"

namespace sqkv {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Converts `rows` rows of a page block to float32. src: (rows, head_dim) in dtype.
void LoadBlock(DType dtype, const void* src, int rows, int head_dim, float* dst) {
  ToFloat(dtype, src, dst, static_cast<size_t>(rows) * head_dim);
}

// Batches of at least this many query rows go through BLAS tiles; fewer (decode) stay in the
// per-row loop, where a GEMM's setup costs more than it saves.
constexpr int kGemmMinRows = 32;
// Keys gathered per tile (from consecutive pages).
constexpr int kTileKeys = 512;

// Query rows per pass of AttendPagesTiled: its score scratch is this many rows by a key tile
// (0.5 MiB), whatever the query's size (over all rows at once it was 8 times the query's own size
// at head_dim 64). Each pass converts the pages again, 1/512 of its products' work.
constexpr int kTileRows = 256;

// The same online softmax as the loop below, one tile of keys at a time, for at most kTileRows
// rows:  S = scale · Q Kᵀ (sgemm), running max and sum per row, O = O·corr + P V (sgemm).
void AttendPagesTiledRows(const float* q, int rows, int head_dim, float scale, DType dtype,
                          int page_tokens, const PageRef* pages, int num_pages, float* out,
                          float* lse) {
  const size_t d = static_cast<size_t>(head_dim);
  const size_t block_bytes = static_cast<size_t>(page_tokens) * d * DTypeSize(dtype);
  std::vector<float> k(static_cast<size_t>(kTileKeys + page_tokens) * d);
  std::vector<float> v(k.size());
  std::vector<float> s(static_cast<size_t>(rows) * (kTileKeys + page_tokens));
  std::vector<float> m(rows, kNegInf), l(rows, 0.f);
  std::fill(out, out + rows * d, 0.f);
  int p = 0;
  while (p < num_pages) {
    int n = 0;  // keys in this tile
    for (; p < num_pages && n < kTileKeys; ++p) {
      const int valid = pages[p].valid;
      const auto* base = static_cast<const uint8_t*>(pages[p].data);
      LoadBlock(dtype, base, valid, head_dim, k.data() + n * d);
      LoadBlock(dtype, base + block_bytes, valid, head_dim, v.data() + n * d);
      n += valid;
    }
    if (n == 0) continue;
    // s: (rows, n) = scale · q (rows, d) · kᵀ (d, n)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, head_dim, scale, q, head_dim,
                k.data(), head_dim, 0.f, s.data(), n);
    for (int r = 0; r < rows; ++r) {
      float* sr = s.data() + static_cast<size_t>(r) * n;
      const float tile_max = *std::max_element(sr, sr + n);
      const float new_m = std::max(m[r], tile_max);
      const float correction = std::exp(m[r] - new_m);  // 0 on the first tile
      float sum = 0.f;
      for (int j = 0; j < n; ++j) {
        sr[j] = std::exp(sr[j] - new_m);
        sum += sr[j];
      }
      l[r] = l[r] * correction + sum;
      m[r] = new_m;
      float* o = out + r * d;
      for (size_t c = 0; c < d; ++c) o[c] *= correction;
    }
    // out (rows, d) += p (rows, n) · v (n, d)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, head_dim, n, 1.f, s.data(), n,
                v.data(), head_dim, 1.f, out, head_dim);
  }
  for (int r = 0; r < rows; ++r) {
    if (l[r] == 0.f) {
      lse[r] = kNegInf;
      continue;
    }
    const float inv = 1.f / l[r];
    for (size_t c = 0; c < d; ++c) out[r * d + c] *= inv;
    lse[r] = m[r] + std::log(l[r]);
  }
}

void AttendPagesTiled(const float* q, int rows, int head_dim, float scale, DType dtype,
                      int page_tokens, const PageRef* pages, int num_pages, float* out,
                      float* lse) {
  const size_t d = static_cast<size_t>(head_dim);
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    AttendPagesTiledRows(q + r0 * d, std::min(kTileRows, rows - r0), head_dim, scale, dtype,
                         page_tokens, pages, num_pages, out + r0 * d, lse + r0);
  }
}

// The per-row loop (decode batches). For each page: its keys and values to float32 once, every
// row's scaled scores, then per row the online-softmax update. Built twice (AVX2 + FMA and the
// baseline), the first the CPU runs chosen at load time.
SQKV_CPU_CLONES void AttendPagesLoop(
    const float* q, int rows, int head_dim, float scale, DType dtype, int page_tokens,
    const PageRef* pages, int num_pages, float* out, float* lse) {
  const size_t d = static_cast<size_t>(head_dim);
  const size_t block_bytes = static_cast<size_t>(page_tokens) * d * DTypeSize(dtype);
  std::vector<float> k(static_cast<size_t>(page_tokens) * d);
  std::vector<float> v(static_cast<size_t>(page_tokens) * d);
  std::vector<float> m(rows, kNegInf);  // running max of scaled scores
  std::vector<float> l(rows, 0.f);      // running Σ exp(s - m)
  std::vector<float> s(static_cast<size_t>(rows) * page_tokens);  // (rows, page_tokens)
  std::fill(out, out + rows * d, 0.f);

  for (int p = 0; p < num_pages; ++p) {
    const int valid = pages[p].valid;
    const auto* base = static_cast<const uint8_t*>(pages[p].data);
    LoadBlock(dtype, base, valid, head_dim, k.data());
    LoadBlock(dtype, base + block_bytes, valid, head_dim, v.data());
    for (int t = 0; t < valid; ++t) {
      const float* kt = k.data() + t * d;
      for (int r = 0; r < rows; ++r) s[r * page_tokens + t] = Dot(q + r * d, kt, d) * scale;
    }
    for (int r = 0; r < rows; ++r) {
      float* o = out + r * d;
      const float* sr = s.data() + r * page_tokens;
      float page_max = kNegInf;
      for (int t = 0; t < valid; ++t) page_max = std::max(page_max, sr[t]);
      const float new_m = std::max(m[r], page_max);
      // Rescale what was accumulated under the old max (exp(-inf) = 0 on the first page).
      const float correction = std::exp(m[r] - new_m);
      l[r] *= correction;
      for (size_t c = 0; c < d; ++c) o[c] *= correction;
      for (int t = 0; t < valid; ++t) {
        const float w = std::exp(sr[t] - new_m);
        l[r] += w;
        const float* vt = v.data() + t * d;
        for (size_t c = 0; c < d; ++c) o[c] += w * vt[c];
      }
      m[r] = new_m;
    }
  }
  for (int r = 0; r < rows; ++r) {
    if (l[r] == 0.f) {  // nothing attended: the empty state
      lse[r] = kNegInf;
      continue;
    }
    const float inv = 1.f / l[r];
    for (size_t c = 0; c < d; ++c) out[r * d + c] *= inv;
    lse[r] = m[r] + std::log(l[r]);
  }
}

}  // namespace

void AttendPages(const float* q, int rows, int head_dim, float scale, DType dtype, int page_tokens,
                 const PageRef* pages, int num_pages, float* out, float* lse) {
  if (rows >= kGemmMinRows) {
    AttendPagesTiled(q, rows, head_dim, scale, dtype, page_tokens, pages, num_pages, out, lse);
    return;
  }
  AttendPagesLoop(q, rows, head_dim, scale, dtype, page_tokens, pages, num_pages, out, lse);
}

void MergeStates(float* out_a, float* lse_a, const float* out_b, const float* lse_b, int rows,
                 int head_dim) {
  for (int r = 0; r < rows; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    if (lb == kNegInf) continue;
    float* oa = out_a + static_cast<size_t>(r) * head_dim;
    const float* ob = out_b + static_cast<size_t>(r) * head_dim;
    if (la == kNegInf) {
      std::copy(ob, ob + head_dim, oa);
      lse_a[r] = lb;
      continue;
    }
    const float mx = std::max(la, lb);
    const float wa = std::exp(la - mx), wb = std::exp(lb - mx);
    const float sum = wa + wb;
    for (int c = 0; c < head_dim; ++c) oa[c] = (wa * oa[c] + wb * ob[c]) / sum;
    lse_a[r] = mx + std::log(sum);
  }
}

}  // namespace sqkv
