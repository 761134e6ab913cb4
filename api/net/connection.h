// Private: one client connection to a server, used by one thread at a time. Every call has a
// deadline; a call that fails on the network (or times out) breaks the connection for good.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "api/net/client.h"
#include "api/net/messages.h"

namespace sqkv::net {

class Connection {
 public:
  using Clock = std::chrono::steady_clock;
  using OnProgress = std::function<void(const ProgressReply&)>;
  // Asked every 100 ms while a call waits (may be null): true gives up the call (Cancelled).
  using IsCancelled = std::function<bool()>;

  // Connects to host:port and says hello (with options.token) within options.connect_timeout_ms.
  static Status Open(const std::string& host, const std::string& port, const ClientOptions& options,
                     std::unique_ptr<Connection>* out);
  virtual ~Connection() = default;

  // Sends `request` and reads the answer to it (progress answers go to on_progress, may be null).
  // Unavailable when the network fails or `deadline` passes, Cancelled when `cancelled` says so;
  // then broken() is true (the connection is closed, which tells the server: an import or
  // rebuild stops there). A non-OK answer from the server is returned in out->status, with OK
  // here.
  virtual Status Call(const Request& request, Clock::time_point deadline, Response* out,
                      const OnProgress& on_progress, const IsCancelled& cancelled) = 0;
  virtual bool broken() const = 0;
};

}  // namespace sqkv::net
