// serve: runs the store as a server (api/net/server.h) until SIGINT or SIGTERM.
#include <csignal>
#include <cstdio>
#include <ctime>

#include "api/net/client.h"
#include "api/net/server.h"
#include "tools/sqkv/cli.h"

namespace sqkv::cli {
namespace {

struct ServeArgs {
  net::ServerOptions options;
  std::string token_file;
  uint64_t max_message_mib = 256;
};

void LogLine(const std::string& line) {
  const std::time_t now = std::time(nullptr);
  char stamp[32];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  std::fprintf(stderr, "%s sqkv serve: %s\n", stamp, line.c_str());
  std::fflush(stderr);
}

int RunServe(ServeArgs a, const GlobalOptions& g) {
  if (!g.server.empty()) {
    return Fail(Status::InvalidArgument("serve opens a store directory (--data), not --server"));
  }
  if (a.options.metrics_listen == "off") a.options.metrics_listen.clear();
  if (!a.token_file.empty()) {
    if (Status s = net::ReadTokenFile(a.token_file, &a.options.auth_token); !s.ok()) return Fail(s);
  }
  constexpr uint64_t kMib = uint64_t{1} << 20;
  a.options.max_message_bytes = a.max_message_mib * kMib;
  // Upload chunks must fit in a message: a limit under the default chunk takes smaller chunks
  // (the server tells clients the chunk size).
  if (a.options.max_message_bytes > net::kChunkMessageRoom &&
      a.options.chunk_bytes + net::kChunkMessageRoom > a.options.max_message_bytes) {
    a.options.chunk_bytes =
        static_cast<uint32_t>(a.options.max_message_bytes - net::kChunkMessageRoom);
  }
  a.options.handle_signals = true;
  a.options.log = LogLine;
  // A peer that goes away mid-write must not kill the server (Asio also sends with MSG_NOSIGNAL).
  std::signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<Store> store;
  if (Status s = OpenStore(g, &store, /*create=*/true); !s.ok()) return Fail(s);
  std::unique_ptr<net::Server> server;
  if (Status s = net::Server::Start(a.options, store.get(), &server); !s.ok()) return Fail(s);
  // One line on stdout for scripts (and tests that ask for port 0).
  std::printf("listening on %s%s%s\n", server->address().c_str(),
              server->metrics_address().empty() ? "" : ", metrics on ",
              server->metrics_address().c_str());
  std::fflush(stdout);
  if (Status s = server->Wait(); !s.ok()) return Fail(s);
  server.reset();
  store.reset();
  return kExitOk;
}

}  // namespace

void AddServe(CLI::App& app, GlobalOptions& g, Runner* run) {
  auto* cmd = app.add_subcommand(
      "serve",
      "Serve the store over TCP (Cap'n Proto) until SIGINT/SIGTERM; other sqkv commands "
      "reach it with --server");
  auto a = std::make_shared<ServeArgs>();
  net::ServerOptions& o = a->options;
  cmd->add_option("--listen", o.listen, "HOST:PORT to accept clients on (port 0: any free one)")
      ->capture_default_str();
  cmd->add_option("--metrics-listen", o.metrics_listen,
                  "HOST:PORT of the Prometheus endpoint GET /metrics ('off' disables)")
      ->capture_default_str();
  cmd->add_option("--auth-token-file", a->token_file,
                  "Require every connection to present the token in this file")
      ->check(CLI::ExistingFile);
  cmd->add_option("--io-threads", o.io_threads, "Network threads")->capture_default_str();
  cmd->add_option("--workers", o.workers, "Threads running store calls (0: one per core)")
      ->capture_default_str();
  cmd->add_option("--max-message-mib", a->max_message_mib, "Largest message accepted, MiB")
      ->capture_default_str();
  cmd->add_option("--deadline-ms", o.default_deadline_ms,
                  "Deadline of a request that names none (0: none; long calls have none)")
      ->capture_default_str();
  cmd->add_option("--idle-timeout-ms", o.idle_timeout_ms,
                  "Close connections silent this long between requests")
      ->capture_default_str();
  cmd->add_option("--upload-dir", o.upload_dir,
                  "Where imports are uploaded (default: DATA/uploads)");
  *run = [a, &g]() { return RunServe(*a, g); };
}

}  // namespace sqkv::cli
