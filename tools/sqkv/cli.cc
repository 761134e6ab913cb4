#include "tools/sqkv/cli.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

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
    case Status::Code::kCancelled:
      return kExitCancelled;
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

namespace {

std::atomic<bool> g_interrupted{false};
static_assert(std::atomic<bool>::is_always_lock_free, "set from a signal handler");
struct sigaction g_old_int, g_old_term;

extern "C" void OnInterrupt(int) {
  const int saved_errno = errno;
  g_interrupted.store(true);
  // The next SIGINT or SIGTERM, either one, takes the action they had before (the default).
  sigaction(SIGINT, &g_old_int, nullptr);
  sigaction(SIGTERM, &g_old_term, nullptr);
  static const char kNote[] =
      "\nsqkv: interrupted: stopping after the current (layer, kv head), publishing nothing "
      "unless already publishing (again to quit at once)\n";
  const ssize_t ignored = ::write(STDERR_FILENO, kNote, sizeof(kNote) - 1);
  (void)ignored;
  errno = saved_errno;
}

}  // namespace

CancelOnInterrupt::CancelOnInterrupt() {
  g_interrupted.store(false);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnInterrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // the handler itself puts the previous actions back
  // A signal ignored when we started (a background job of a script, nohup) stays ignored.
  sigaction(SIGINT, nullptr, &g_old_int);
  sigaction(SIGTERM, nullptr, &g_old_term);
  if (g_old_int.sa_handler != SIG_IGN) sigaction(SIGINT, &sa, nullptr);
  if (g_old_term.sa_handler != SIG_IGN) sigaction(SIGTERM, &sa, nullptr);
}

CancelOnInterrupt::~CancelOnInterrupt() {
  sigaction(SIGINT, &g_old_int, nullptr);
  sigaction(SIGTERM, &g_old_term, nullptr);
}

std::function<bool()> CancelOnInterrupt::Asked() const {
  return [] { return g_interrupted.load(); };
}

void SetTestHooks(ImportOptions* options) {
  const char* crash_at = std::getenv("SQKV_TEST_CRASH_AT");
  const char* interrupt_at = std::getenv("SQKV_TEST_INTERRUPT_AT");
  const char* truncate_at = std::getenv("SQKV_TEST_TRUNCATE_AT");  // "<stage>:<file>"
  if (crash_at == nullptr && interrupt_at == nullptr && truncate_at == nullptr) return;
  std::string truncate_stage, truncate_file;
  if (truncate_at != nullptr) {
    const std::string t = truncate_at;
    const size_t colon = t.find(':');
    truncate_stage = t.substr(0, colon);
    truncate_file = colon == std::string::npos ? "" : t.substr(colon + 1);
  }
  options->on_stage = [crash = std::string(crash_at ? crash_at : ""),
                       interrupt = std::string(interrupt_at ? interrupt_at : ""), truncate_stage,
                       truncate_file, raised = false](std::string_view at) mutable {
    if (at == crash) std::raise(SIGKILL);
    if (at == interrupt && !raised) {
      raised = true;
      std::raise(SIGTERM);  // handled as Ctrl-C is, and not ignored in background jobs
    }
    if (at == truncate_stage && !truncate_file.empty()) {
      // Another process shrinking the source under the import: its next read fails (IOError).
      if (::truncate(truncate_file.c_str(), 4096) != 0) std::raise(SIGKILL);
      truncate_file.clear();
    }
  };
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
