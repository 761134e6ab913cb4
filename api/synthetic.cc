#include "api/synthetic.h"

#include <random>

#include "storage/safetensors.h"

namespace sqkv {

Status WriteSyntheticContext(const SyntheticOptions& a, const std::string& path,
                             std::vector<float>* queries) {
  if (a.layers < 1 || a.kv_heads < 1 || a.tokens < 1 || a.head_dim < 1 || a.topics < 1 ||
      a.q_heads < a.kv_heads || a.q_heads % a.kv_heads != 0 || a.window < 0 || a.n < 1) {
    return Status::InvalidArgument("synthetic context: shapes must be positive and q_heads a "
                                   "multiple of kv_heads");
  }
  std::mt19937_64 rng(a.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t d = a.head_dim, head = static_cast<size_t>(a.tokens) * d;
  const int group = a.q_heads / a.kv_heads;
  SafetensorsWriter w;
  for (int l = 0; l < a.layers; ++l) {
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
    auto add = [&](const std::string& name, const std::vector<float>& x,
                   std::vector<int64_t> shape) {
      std::vector<uint8_t> bytes(x.size() * DTypeSize(a.dtype));
      FromFloat(a.dtype, x.data(), bytes.data(), x.size());
      w.Add(name, a.dtype, std::move(shape), bytes.data());
    };
    add("k." + std::to_string(l), k, {a.kv_heads, a.tokens, a.head_dim});
    add("v." + std::to_string(l), v, {a.kv_heads, a.tokens, a.head_dim});
    if (a.window > 0) add("q." + std::to_string(l), q, {a.q_heads, a.window, a.head_dim});
    if (l == 0 && queries != nullptr) *queries = std::move(user);
  }
  w.SetMetadata({{"generator", "sqkv synth"}, {"seed", std::to_string(a.seed)}});
  return w.Write(path);
}

}  // namespace sqkv
