// The SqueezeKV client: a Store whose calls go to a server (`sqkv serve`) instead of a data
// directory. Same interface, same results:
//
//   std::unique_ptr<Store> store;
//   SQKV_RETURN_IF_ERROR(net::ConnectStore("127.0.0.1:7781", /*token=*/"", &store));
//   SQKV_RETURN_IF_ERROR(store->Query("doc", 0, q, q_heads, n, head_dim, {}, &result));
//
// Safe to use from several threads: each call takes an idle connection from a small pool (opening
// one when none is idle), so concurrent calls run concurrently on the server. A call that fails
// on the network is Unavailable; the connection is dropped and the next call opens a fresh one.
// data_dir() returns the server's address.
//
// Import uploads the file in chunks and the server imports it; `ImportOptions::progress` reports
// the server's indexing progress; `on_stage` is not carried.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "api/store.h"
#include "common/status.h"

namespace sqkv::net {

struct ClientOptions {
  // Shared secret of the server's --auth-token-file; empty when the server has none.
  std::string token;
  // Connecting (TCP and hello) must finish within this. Default: 10000.
  uint32_t connect_timeout_ms = 10000;
  // Deadline of each call, also sent to the server; 0 means the server's default (and no limit
  // on this side for imports). Default: 0.
  uint32_t deadline_ms = 0;
  // Largest reply accepted. Default: 256 MiB.
  uint64_t max_message_bytes = uint64_t{256} << 20;
  // Idle connections kept for reuse. Default: 8.
  int max_idle_connections = 8;
};

// host_port: "127.0.0.1:7781", "localhost:7781" or "[::1]:7781". Connects once (and says hello)
// so that a wrong address or token fails here rather than at the first call.
Status ConnectStore(const std::string& host_port, const std::string& token,
                    std::unique_ptr<Store>* out);
Status ConnectStore(const std::string& host_port, const ClientOptions& options,
                    std::unique_ptr<Store>* out);

// Reads a token file: its content with trailing whitespace (a final newline) removed.
// InvalidArgument when that leaves it empty.
Status ReadTokenFile(const std::string& path, std::string* token);

// Splits "host:port" / "[v6]:port". InvalidArgument on anything else.
Status SplitHostPort(const std::string& host_port, std::string* host, std::string* port);

}  // namespace sqkv::net
