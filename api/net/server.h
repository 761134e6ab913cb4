// The SqueezeKV server: serves a Store over TCP (protocol: api/net/sqkv.capnp) and Prometheus
// metrics over HTTP. `sqkv serve` is a thin wrapper around it.
//
//   std::unique_ptr<Server> server;
//   SQKV_RETURN_IF_ERROR(Server::Start(ServerOptions{}, store.get(), &server));
//   return server->Wait();   // until SIGINT/SIGTERM (handle_signals) or Shutdown()
//
// Threads: `io_threads` run the network (one coroutine per connection); store calls run on a
// separate pool of `workers`, so a slow query never stalls other connections' I/O. Each
// connection carries one request at a time; concurrency comes from connections. A call whose
// deadline passes is answered at once, but a connection reads its next request only once that
// call has ended on the workers (it is not started at all if its deadline passed while queued),
// so a connection never has more than one call on the workers.
//
// Not done: batching queries of different connections into one GPU launch. Store has no batched
// query entry point, so each request is one Store::Query call.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "api/store.h"
#include "common/status.h"

namespace sqkv::net {

// Bytes of a message around an upload chunk's data (the request's other fields): chunk_bytes +
// this must fit in max_message_bytes.
inline constexpr uint64_t kChunkMessageRoom = uint64_t{4} << 10;

struct ServerOptions {
  // host:port to accept clients on; port 0 picks a free one (see Server::address()).
  // Default: "127.0.0.1:7781".
  std::string listen = "127.0.0.1:7781";
  // host:port of the Prometheus endpoint (GET /metrics); empty disables it.
  // Default: "127.0.0.1:9781".
  std::string metrics_listen = "127.0.0.1:9781";
  // When not empty, every connection must first send hello with this token; until then it may
  // send only hello, in a message of at most 64 KiB. Default: empty.
  std::string auth_token;
  // Threads running network I/O. Default: 2.
  int io_threads = 2;
  // Threads running store calls; 0 means std::thread::hardware_concurrency(). Default: 0.
  int workers = 0;
  // Largest message accepted (and sent). Default: 256 MiB.
  uint64_t max_message_bytes = uint64_t{256} << 20;
  // Bytes of large requests (over 1 MiB) held at once, over all connections, counted as they
  // arrive (a sixteenth of this at a time, 64 KiB to 1 MiB) until their call has ended (the
  // decoded request is as large); a request that would exceed it is refused (Unavailable) and its
  // connection closed, so a few huge messages cannot exhaust memory, and clients that announce
  // huge messages without sending them hold only a step each. Default: 1 GiB.
  uint64_t max_inflight_message_bytes = uint64_t{1} << 30;
  // Largest data of one upload chunk (with kChunkMessageRoom, must fit in a message).
  // Default: 8 MiB.
  uint32_t chunk_bytes = 8u << 20;
  // Largest file one import may upload. Default: 64 GiB.
  uint64_t max_upload_bytes = uint64_t{64} << 30;
  // Where uploads are written before Store::Import; emptied at start. Default: empty, meaning
  // "<store data_dir>/uploads".
  std::string upload_dir;
  // Per-request deadline when the request names none (0 = none). Long calls (import, rebuild,
  // calibrate, verify, compact) have no default deadline: they may take minutes. Default: 60000.
  uint32_t default_deadline_ms = 60000;
  // A connection that sends nothing for this long between requests is closed. Default: 300000.
  uint32_t idle_timeout_ms = 300000;
  // Once a message has started, the rest of it must arrive (and a reply must be written) within
  // this. Default: 30000.
  uint32_t io_timeout_ms = 30000;
  // Connections beyond this are closed at once. Lowered at start to what the process's descriptor
  // limit allows (ulimit -n, less a quarter of it and at least 64 for the store), with a log line.
  // Default: 4096.
  int max_connections = 4096;
  // Stop gracefully on SIGINT and SIGTERM. Default: false (the CLI sets it).
  bool handle_signals = false;
  // Receives one line per notable event (start, stop, refused connections). Default: none.
  std::function<void(const std::string&)> log;
};

class Server {
 public:
  // Binds both listeners and starts serving `store`, which must outlive the server.
  static Status Start(const ServerOptions& options, Store* store, std::unique_ptr<Server>* out);
  virtual ~Server() = default;

  // Bound addresses, "host:port" (the real port when 0 was asked for); metrics "" if disabled.
  virtual std::string address() const = 0;
  virtual std::string metrics_address() const = 0;

  // Graceful stop: stop accepting, close idle connections, let running calls finish and be
  // answered; calls still queued for a worker are not started (answered Unavailable). Returns at
  // once; Wait() returns when all is done. Safe from any thread.
  virtual void Shutdown() = 0;
  // Blocks until the server has stopped (Shutdown(), or a signal with handle_signals).
  virtual Status Wait() = 0;
};

}  // namespace sqkv::net
