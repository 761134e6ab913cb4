#include "tools/sqkv/cli.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "api/net/client.h"

namespace sqkv::cli {

int ExitCodeFor(const Status& s) {
  switch (s.code()) {
    case Status::Code::kOk:
      return kExitOk;
    case Status::Code::kInvalidArgument:
      return kExitUsage;
    case Status::Code::kNotFound:
      return kExitNotFound;
    case Status::Code::kAlreadyExists:
      return kExitAlreadyExists;
    case Status::Code::kCorruption:
      return kExitCorruption;
    case Status::Code::kUnavailable:
      return kExitUnavailable;
    case Status::Code::kIOError:
      return kExitIOError;
    case Status::Code::kInternal:
      return kExitError;
  }
  return kExitError;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "sqkv: %s\n", s.ToString().c_str());
  return ExitCodeFor(s);
}

Status OpenStore(const GlobalOptions& g, std::unique_ptr<Store>* out, bool create) {
  if (!g.server.empty()) {
    std::string token;
    if (!g.token_file.empty()) SQKV_RETURN_IF_ERROR(net::ReadTokenFile(g.token_file, &token));
    return net::ConnectStore(g.server, token, out);
  }
  if (!g.token_file.empty()) return Status::InvalidArgument("--token-file needs --server");
  StoreOptions options;
  options.create_if_missing = create;
  if (!g.data_dir.empty()) {
    options.data_dir = g.data_dir;
  } else if (const char* env = std::getenv("SQKV_DATA"); env != nullptr && *env != '\0') {
    options.data_dir = env;
  }
  return Store::Open(options, out);
}

ProgressBar::ProgressBar(std::string label)
    : label_(std::move(label)), enabled_(::isatty(STDERR_FILENO) == 1) {}

void ProgressBar::Update(int done, int total) {
  if (!enabled_ || total <= 0) return;
  const int permille = static_cast<int>(1000LL * done / total);
  if (permille == last_permille_) return;
  last_permille_ = permille;
  constexpr int kWidth = 30;
  const int filled = kWidth * done / total;
  std::fprintf(stderr, "\r%s [%.*s%*s] %3d%% (%d/%d)", label_.c_str(), filled,
               "##############################", kWidth - filled, "", permille / 10, done, total);
  std::fflush(stderr);
}

void ProgressBar::Finish() {
  if (enabled_ && last_permille_ >= 0) std::fprintf(stderr, "\n");
}

nlohmann::json ContextJson(const ContextInfo& c) {
  return {
      {"name", c.name},
      {"version", c.version},
      {"layers", c.layers},
      {"kv_heads", c.kv_heads},
      {"tokens", c.tokens},
      {"head_dim", c.head_dim},
      {"dtype", DTypeName(c.dtype)},
      {"page_tokens", c.page_tokens},
      {"centroid_fraction", c.centroid_fraction},
      {"levels", c.levels},
      {"l1_fraction", c.l1_fraction},
      {"pages", c.layer_first_page.empty() ? 0 : c.layer_first_page.back()},
      {"segment_bytes", c.segment_bytes},
      {"index_bytes", c.index_bytes},
      {"window_queries", c.window_q_heads > 0
                             ? nlohmann::json{{"q_heads", c.window_q_heads}, {"window", c.window}}
                             : nlohmann::json(nullptr)},
      {"created_unix", c.created_unix},
      {"build_seconds", c.build_seconds},
      {"source", c.source},
      {"kmeans", c.kmeans},
  };
}

}  // namespace sqkv::cli
