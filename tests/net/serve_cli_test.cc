// `sqkv serve` as a process, and the other commands with --server: the same files, JSON and exit
// codes as on an embedded store; token files; SIGTERM answers what is in flight and exits 0.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/net/net_testing.h"

extern char** environ;

namespace sqkv::net {
namespace {

using testing::RawSocket;
using testing::ScratchDir;

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

using ::sqkv::testing::CmdResult;

std::string Binary() { return ::sqkv::testing::SqkvBinary(); }

CmdResult Sqkv(const std::vector<std::string>& args) { return ::sqkv::testing::RunSqkv(args); }

// `sqkv serve` on 127.0.0.1 with a free port; killed (SIGKILL) if a test leaves it running.
class ServeProcess {
 public:
  explicit ServeProcess(const std::vector<std::string>& extra) {
    const std::string out = dir_.file("serve.out"), err = dir_.file("serve.err");
    std::vector<std::string> args = {Binary(),           "serve", "--listen", "127.0.0.1:0",
                                     "--metrics-listen", "off"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    const int rc = posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      pid_ = -1;
      return;
    }
    // Bounded wait for "listening on HOST:PORT".
    constexpr int kPolls = 200;
    for (int i = 0; i < kPolls && address_.empty(); ++i) {
      const std::string text = ReadFile(out);
      const std::string prefix = "listening on ";
      const size_t at = text.find(prefix), eol = text.find('\n');
      if (at != std::string::npos && eol != std::string::npos) {
        address_ = text.substr(at + prefix.size(), eol - at - prefix.size());
        break;
      }
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {  // died at start
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ~ServeProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int status;
      waitpid(pid_, &status, 0);
    }
  }

  const std::string& address() const { return address_; }
  std::string log() const { return ReadFile(dir_.file("serve.err")); }

  // Sends `sig` and waits (bounded) for the exit; the exit code, or -1 if it did not exit.
  int SignalAndWait(int sig, std::chrono::milliseconds timeout) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < until) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

 private:
  ScratchDir dir_;
  pid_t pid_ = -1;
  std::string address_;
};

class ServeCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ctx_ = dir_.file("ctx.safetensors");
    q_ = dir_.file("q.npy");
    CmdResult r = Sqkv({"synth", ctx_, "--queries-out", q_, "--tokens", "400", "--layers", "2",
                        "--kv-heads", "2", "--q-heads", "4", "-n", "3", "--head-dim", "64"});
    ASSERT_EQ(r.code, 0) << r.err;
  }
  ScratchDir dir_;
  std::string ctx_, q_;
};

// The fields that must agree between a context imported locally and one imported through a
// server (time of creation, build time and the uploaded file's path differ by nature).
nlohmann::json Comparable(nlohmann::json j) {
  for (const char* k : {"created_unix", "build_seconds", "source"}) j.erase(k);
  return j;
}

TEST_F(ServeCliTest, EveryCommandGivesTheEmbeddedResultsThroughTheServer) {
  ServeProcess serve({"--data", dir_.file("served")});
  ASSERT_FALSE(serve.address().empty()) << serve.log();
  const std::string srv = serve.address();
  const std::string local = dir_.file("local");

  CmdResult a = Sqkv({"--data", local, "import", "doc", ctx_, "--json"});
  CmdResult b = Sqkv({"--server", srv, "import", "doc", ctx_, "--json"});
  ASSERT_EQ(a.code, 0) << a.err;
  ASSERT_EQ(b.code, 0) << b.err;
  EXPECT_EQ(Comparable(nlohmann::json::parse(a.out)), Comparable(nlohmann::json::parse(b.out)));

  for (const std::vector<std::string>& mode :
       {std::vector<std::string>{"--keep", "0.2"}, std::vector<std::string>{"--dense"}}) {
    std::vector<std::string> qa = {"--data",   local,       "query", "doc",   "--layer",
                                   "1",        "--queries", q_,      "--out", dir_.file("qa"),
                                   "--device", "cpu",       "--json"};
    std::vector<std::string> qb = {"--server", srv,         "query", "doc",   "--layer",
                                   "1",        "--queries", q_,      "--out", dir_.file("qb"),
                                   "--device", "cpu",       "--json"};
    qa.insert(qa.end(), mode.begin(), mode.end());
    qb.insert(qb.end(), mode.begin(), mode.end());
    a = Sqkv(qa);
    b = Sqkv(qb);
    ASSERT_EQ(a.code, 0) << a.err;
    ASSERT_EQ(b.code, 0) << b.err;
    for (const char* f : {"output.npy", "lse.npy", "selection.json"}) {
      const std::string fa = ReadFile(dir_.file("qa") + "/" + f);
      EXPECT_FALSE(fa.empty()) << f;
      EXPECT_EQ(fa, ReadFile(dir_.file("qb") + "/" + f)) << f << " differs";
    }
    auto ja = nlohmann::json::parse(a.out), jb = nlohmann::json::parse(b.out);
    EXPECT_EQ(ja["kept_fraction"], jb["kept_fraction"]);
    EXPECT_EQ(ja["stats"]["tokens_selected"], jb["stats"]["tokens_selected"]);
  }

  a = Sqkv({"--data", local, "ls", "--json"});
  b = Sqkv({"--server", srv, "ls", "--json"});
  ASSERT_EQ(b.code, 0) << b.err;
  auto la = nlohmann::json::parse(a.out), lb = nlohmann::json::parse(b.out);
  ASSERT_EQ(la.size(), 1u);
  ASSERT_EQ(lb.size(), 1u);
  EXPECT_EQ(Comparable(la[0]), Comparable(lb[0]));
  a = Sqkv({"--data", local, "info", "doc", "--json"});
  b = Sqkv({"--server", srv, "info", "doc", "--json"});
  EXPECT_EQ(Comparable(nlohmann::json::parse(a.out)), Comparable(nlohmann::json::parse(b.out)));
  for (const char* cmd : {"verify", "stats", "compact"}) {
    b = Sqkv({"--server", srv, cmd});
    EXPECT_EQ(b.code, 0) << cmd << ": " << b.err;
  }
  // The server's tiers, after the queries above went through it.
  b = Sqkv({"--server", srv, "stats", "--json"});
  ASSERT_EQ(b.code, 0) << b.err;
  const auto tiers = nlohmann::json::parse(b.out)["tiers"];
  EXPECT_GE(tiers["index"]["layers_cached"].get<uint64_t>(), 1u);
  EXPECT_GT(tiers["index"]["bytes_cached"].get<uint64_t>(), 0u);
  EXPECT_GT(tiers["host"]["hits"].get<uint64_t>() + tiers["host"]["misses"].get<uint64_t>(), 0u);
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"pin", "doc", "--tier", "host"},
        std::vector<std::string>{"unpin", "doc"}, std::vector<std::string>{"preload", "doc"}}) {
    std::vector<std::string> la_args = {"--data", local}, lb_args = {"--server", srv};
    la_args.insert(la_args.end(), args.begin(), args.end());
    lb_args.insert(lb_args.end(), args.begin(), args.end());
    a = Sqkv(la_args);
    b = Sqkv(lb_args);
    EXPECT_EQ(b.code, 0) << args[0] << ": " << b.err;
    EXPECT_EQ(a.out, b.out) << args[0];
  }
  // Same exit codes for the same errors.
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"info", "missing"}, std::vector<std::string>{"rm", "missing"},
        std::vector<std::string>{"import", "doc", ctx_},
        std::vector<std::string>{"query", "doc", "--layer", "7", "--queries", q_, "--keep", "0.1",
                                 "--out", dir_.file("qx")}}) {
    std::vector<std::string> la_args = {"--data", local}, lb_args = {"--server", srv};
    la_args.insert(la_args.end(), args.begin(), args.end());
    lb_args.insert(lb_args.end(), args.begin(), args.end());
    a = Sqkv(la_args);
    b = Sqkv(lb_args);
    EXPECT_NE(a.code, 0);
    EXPECT_EQ(a.code, b.code) << args[0] << ": " << a.err << " vs " << b.err;
  }
  b = Sqkv({"--server", srv, "rm", "doc"});
  EXPECT_EQ(b.code, 0) << b.err;
  b = Sqkv({"--server", "127.0.0.1:1", "ls"});  // nobody there
  EXPECT_EQ(b.code, 6) << b.err;
  b = Sqkv({"--server", "no-port", "ls"});
  EXPECT_EQ(b.code, 2) << b.err;
}

TEST_F(ServeCliTest, TokenFileIsRequiredWhenTheServerHasOne) {
  const std::string token = dir_.file("token"), wrong = dir_.file("wrong");
  std::ofstream(token) << "correct horse battery staple\n";
  std::ofstream(wrong) << "incorrect\n";
  ServeProcess serve({"--data", dir_.file("served"), "--auth-token-file", token});
  ASSERT_FALSE(serve.address().empty()) << serve.log();
  EXPECT_EQ(Sqkv({"--server", serve.address(), "ls"}).code, 6);
  EXPECT_EQ(Sqkv({"--server", serve.address(), "--token-file", wrong, "ls"}).code, 6);
  CmdResult r = Sqkv({"--server", serve.address(), "--token-file", token, "ls"});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(serve.log().find("refused a connection"), std::string::npos);
}

TEST_F(ServeCliTest, SigtermAnswersInFlightRequestsAndExitsZero) {
  ServeProcess serve({"--data", dir_.file("served")});
  ASSERT_FALSE(serve.address().empty()) << serve.log();
  CmdResult r = Sqkv({"--server", serve.address(), "import", "doc", ctx_});
  ASSERT_EQ(r.code, 0) << r.err;
  r = Sqkv({"--server", serve.address(), "query", "doc", "--layer", "0", "--queries", q_, "--keep",
            "0.1", "--out", dir_.file("q0")});
  ASSERT_EQ(r.code, 0) << r.err;

  RawSocket idle(serve.address()), busy(serve.address());
  ASSERT_TRUE(idle.ok() && busy.ok());
  // A request on its way when the signal comes: answered whole; or, if the server saw the signal
  // before a worker took the call, answered Unavailable ("not started"); or, if it saw it before
  // the request's first byte, the connection is closed without an answer (server.h). The second
  // case failed this test once in a fresh-clone test run beside another build: it expected only
  // the other two.
  QueryCall call;
  call.name = "doc";
  call.q_heads = 4;
  call.n = 3;
  call.head_dim = 64;
  call.q.assign(4 * 3 * 64, 0.5f);
  ASSERT_TRUE(busy.SendRequest(Request{9, 0, call}));
  const int code = serve.SignalAndWait(SIGTERM, std::chrono::seconds(20));
  EXPECT_EQ(code, 0) << serve.log();
  Response answer;
  if (busy.ReadResponse(&answer, std::chrono::seconds(2))) {
    EXPECT_EQ(answer.id, 9u);
    const bool not_started = answer.status.IsUnavailable() &&
                             answer.status.message().find("not started") != std::string::npos;
    EXPECT_TRUE(answer.status.ok() || not_started) << answer.status.ToString();
  }
  EXPECT_TRUE(idle.ClosedByPeer(std::chrono::seconds(2)));
  EXPECT_NE(serve.log().find("stopped"), std::string::npos) << serve.log();
}

}  // namespace
}  // namespace sqkv::net
