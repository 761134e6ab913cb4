#include "api/synthetic.h"

#include <algorithm>
#include <atomic>
#include <random>
#include <thread>

#include "storage/safetensors.h"

namespace sqkv {

Status WriteSyntheticContext(const SyntheticOptions& a, const std::string& path,
                             std::vector<float>* queries) {
  if (a.layers < 1 || a.kv_heads < 1 || a.tokens < 1 || a.head_dim < 1 || a.topics < 1 ||
      a.q_heads < a.kv_heads || a.q_heads % a.kv_heads != 0 || a.window < 0 || a.n < 1) {
    return Status::InvalidArgument("synthetic context: shapes must be positive and q_heads a "
                                   "multiple of kv_heads");
  }
  const size_t d = a.head_dim, head = static_cast<size_t>(a.tokens) * d;
  const int group = a.q_heads / a.kv_heads;
  // Layers are generated in parallel, each from its own seeded generator (deterministic).
  struct LayerData {
    std::vector<uint8_t> k, v, q;
    std::vector<float> user;
  };
  std::vector<LayerData> out(a.layers);
  auto make_layer = [&](int l) {
    std::mt19937_64 rng(a.seed * 1000003ull + static_cast<uint64_t>(l));
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<float> k(a.kv_heads * head), v(a.kv_heads * head);
    std::vector<float> q(static_cast<size_t>(a.q_heads) * a.window * d);
    std::vector<float> user(static_cast<size_t>(a.q_heads) * a.n * d);
    for (int h = 0; h < a.kv_heads; ++h) {
      // Topic directions of this head; each token's key is a noisy copy of one topic.
      std::vector<float> topics(a.topics * d);
      for (auto& x : topics) x = normal(rng);
      std::uniform_int_distribution<int> pick(0, a.topics - 1);
      for (int t = 0; t < a.tokens; ++t) {
        const int c = pick(rng);
        for (size_t i = 0; i < d; ++i) {
          k[h * head + t * d + i] = topics[c * d + i] + 0.35f * normal(rng);
          v[h * head + t * d + i] = normal(rng);
        }
      }
      // A query looks mostly at one topic (shared by the query heads of the group, as GQA heads
      // tend to agree) and a little at another. The user's tokens ask about one part of the
      // document (one main topic); the window's tokens, the document's own last tokens, move
      // from topic to topic.
      auto fill_queries = [&](std::vector<float>& dst, int count, bool topic_per_token) {
        std::vector<int> main_topic(count, pick(rng));
        if (topic_per_token) {
          for (auto& t : main_topic) t = pick(rng);
        }
        for (int gq = 0; gq < group; ++gq) {
          const int t2 = pick(rng);
          for (int j = 0; j < count; ++j) {
            const int t1 = main_topic[j];
            float* row = dst.data() + ((static_cast<size_t>(h) * group + gq) * count + j) * d;
            for (size_t i = 0; i < d; ++i) {
              row[i] = 1.2f * topics[t1 * d + i] + 0.6f * topics[t2 * d + i] + 0.5f * normal(rng);
            }
          }
        }
      };
      fill_queries(q, a.window, /*topic_per_token=*/true);
      fill_queries(user, a.n, /*topic_per_token=*/false);
    }
    auto encode = [&](const std::vector<float>& x) {
      std::vector<uint8_t> bytes(x.size() * DTypeSize(a.dtype));
      FromFloat(a.dtype, x.data(), bytes.data(), x.size());
      return bytes;
    };
    out[l].k = encode(k);
    out[l].v = encode(v);
    if (a.window > 0) out[l].q = encode(q);
    out[l].user = std::move(user);
  };
  const int threads = std::max(1u, std::min<unsigned>(std::thread::hardware_concurrency(), a.layers));
  std::vector<std::thread> pool;
  std::atomic<int> next{0};
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int l = next++; l < a.layers; l = next++) make_layer(l);
    });
  }
  for (auto& t : pool) t.join();
  SafetensorsWriter w;
  for (int l = 0; l < a.layers; ++l) {
    w.Add("k." + std::to_string(l), a.dtype, {a.kv_heads, a.tokens, a.head_dim}, out[l].k.data());
    w.Add("v." + std::to_string(l), a.dtype, {a.kv_heads, a.tokens, a.head_dim}, out[l].v.data());
    if (a.window > 0) {
      w.Add("q." + std::to_string(l), a.dtype, {a.q_heads, a.window, a.head_dim}, out[l].q.data());
    }
    out[l].k.clear();
    out[l].k.shrink_to_fit();
    out[l].v.clear();
    out[l].v.shrink_to_fit();
  }
  if (queries != nullptr) *queries = std::move(out[0].user);
  w.SetMetadata({{"generator", "sqkv synth"}, {"seed", std::to_string(a.seed)}});
  return w.Write(path);
}

}  // namespace sqkv
