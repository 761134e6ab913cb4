// RemoteStore: the Store interface over connections to a server.
#include "api/net/client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <vector>

#include "api/net/connection.h"
#include "storage/file_util.h"

namespace sqkv::net {
namespace {

using Clock = std::chrono::steady_clock;

// Upload chunk size when the server allows more. Default: 4 MiB (a few ms on a LAN).
constexpr uint32_t kMaxClientChunkBytes = 4u << 20;
constexpr size_t kMaxPortDigits = 5;
constexpr unsigned long kMaxPort = 65535;

// Closes a file descriptor when it goes out of scope.
class FileCloser {
 public:
  explicit FileCloser(int fd) : fd_(fd) {}
  ~FileCloser() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileCloser(const FileCloser&) = delete;
  FileCloser& operator=(const FileCloser&) = delete;

 private:
  int fd_;
};

Status FileError(const std::string& what, const std::string& path) {
  const int err = errno;
  const std::string m = what + " " + path + ": " + std::strerror(err);
  return err == ENOENT ? Status::NotFound(m) : Status::IOError(m);
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

class RemoteStore final : public Store {
 public:
  RemoteStore(const std::string& host_port, std::string host, std::string port,
              const ClientOptions& options)
      : Store(host_port), host_(std::move(host)), port_(std::move(port)), options_(options) {}

  // Opens the first connection (and keeps it idle for the first call).
  Status Connect() {
    std::unique_ptr<Connection> conn;
    SQKV_RETURN_IF_ERROR(Connection::Open(host_, port_, options_, &conn));
    Release(std::move(conn));
    return Status::Ok();
  }

  Status Import(const std::string& name, const std::string& path, const ImportOptions& options,
                ContextInfo* info) override {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return FileError("open", path);
    FileCloser closer(fd);
    struct stat st;
    if (::fstat(fd, &st) != 0) return FileError("stat", path);
    if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(path + " is not a regular file");
    const uint64_t total = static_cast<uint64_t>(st.st_size);

    std::unique_ptr<Connection> conn;
    SQKV_RETURN_IF_ERROR(Acquire(&conn));
    // Every call of an upload goes over this one connection (uploads belong to a connection).
    ImportBeginCall begin;
    begin.name = name;
    begin.file_name = BaseName(path);
    begin.total_bytes = total;
    begin.options = options;
    begin.options.progress = nullptr;
    begin.options.cancelled = nullptr;
    begin.options.on_stage = nullptr;
    Response reply;
    SQKV_RETURN_IF_ERROR(CallOn(*conn, std::move(begin), &reply, nullptr));
    if (!reply.status.ok()) return Done(std::move(conn), reply.status);
    const auto* began = std::get_if<ImportBeginReply>(&reply.body);
    if (began == nullptr || began->chunk_bytes == 0) {
      return Status::Internal("server " + data_dir() + " answered importBegin badly");
    }
    const uint64_t id = began->upload_id;
    const size_t chunk = std::min(began->chunk_bytes, kMaxClientChunkBytes);
    ImportChunkCall piece;
    piece.upload_id = id;
    for (uint64_t offset = 0; offset < total;) {
      // Cancelled during the upload: the connection (and with it the upload) is dropped.
      if (options.cancelled && options.cancelled()) return UploadCancelled(name, offset, total);
      const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, total - offset));
      piece.offset = offset;
      piece.data.resize(n);
      size_t got = 0;
      SQKV_RETURN_IF_ERROR(PreadFull(fd, offset, n, piece.data.data(), path, &got));
      if (got < n) return Status::IOError(path + " shrank while being uploaded");
      SQKV_RETURN_IF_ERROR(CallOn(*conn, piece, &reply, nullptr));
      if (!reply.status.ok()) return Done(std::move(conn), reply.status);
      offset += n;
    }
    SQKV_RETURN_IF_ERROR(CallOn(*conn, ImportEndCall{id}, &reply, ProgressTo(options.progress),
                                options.cancelled));
    if (!reply.status.ok()) return Done(std::move(conn), reply.status);
    auto* c = std::get_if<ContextInfo>(&reply.body);
    if (c == nullptr) return Status::Internal("server " + data_dir() + " answered importEnd badly");
    if (info != nullptr) *info = std::move(*c);
    return Done(std::move(conn), Status::Ok());
  }

  Status Query(const std::string& name, int layer, const float* q, int q_heads, int n, int head_dim,
               const QueryOptions& options, QueryResult* result) override {
    QueryCall call;
    call.name = name;
    call.layer = layer;
    call.q_heads = q_heads;
    call.n = n;
    call.head_dim = head_dim;
    call.options = options;
    if (q_heads > 0 && n > 0 && head_dim > 0) {
      if (q == nullptr) return Status::InvalidArgument("queries are null");
      call.q.assign(q, q + static_cast<size_t>(q_heads) * n * head_dim);
    }
    Response reply;
    SQKV_RETURN_IF_ERROR(RoundTrip(std::move(call), &reply));
    if (!reply.status.ok()) return reply.status;
    auto* r = std::get_if<QueryResult>(&reply.body);
    if (r == nullptr) return Status::Internal("server " + data_dir() + " answered query badly");
    const size_t rows = static_cast<size_t>(q_heads) * n;
    if (r->output.size() != rows * head_dim || r->lse.size() != rows) {
      return Status::Internal("server " + data_dir() + " answered with tensors of the wrong size");
    }
    *result = std::move(*r);
    return Status::Ok();
  }

  Status List(std::vector<ContextInfo>* out) override {
    return Ask(ListCall{}, "list", out);
  }

  Status Info(const std::string& name, ContextInfo* out) override {
    return Ask(InfoCall{name}, "info", out);
  }

  Status Remove(const std::string& name) override {
    return Send(RemoveCall{name});
  }

  Status Rebuild(const std::string& name, const ImportOptions& options,
                 ContextInfo* info) override {
    RebuildCall call{name, options};
    call.options.progress = nullptr;
    call.options.cancelled = nullptr;
    call.options.on_stage = nullptr;
    return Ask(std::move(call), "rebuild", info, ProgressTo(options.progress), options.cancelled);
  }

  Status Calibrate(const std::string& name, const std::vector<WindowQueries>* queries,
                   const std::vector<float>& sparsities) override {
    CalibrateCall call;
    call.name = name;
    call.use_stored_queries = queries == nullptr;
    if (queries != nullptr) call.queries = *queries;
    call.sparsities = sparsities;
    return Send(std::move(call));
  }

  Status GetThresholds(const std::string& name, int layer, Thresholds* out) override {
    return Ask(GetThresholdsCall{name, layer}, "getThresholds", out);
  }

  Status Verify(const std::string& name, const ProgressFn& progress,
                VerifyReport* report) override {
    return Ask(VerifyCall{name}, "verify", report, ProgressTo(progress));
  }

  Status Compact(CompactReport* report) override {
    return Ask(CompactCall{}, "compact", report);
  }

  Status Stats(StoreStats* out) override {
    return Ask(StatsCall{}, "stats", out);
  }

  Status Pin(const std::string& name, Tier tier) override {
    return Send(PinCall{name, tier});
  }

  Status Unpin(const std::string& name) override {
    return Send(UnpinCall{name});
  }

  Status Preload(const std::string& name, Tier tier) override {
    return Send(PreloadCall{name, tier});
  }

  Status ListPins(std::vector<std::pair<std::string, Tier>>* out) override {
    return Ask(ListPinsCall{}, "listPins", out);
  }

  Status GetTierStats(TierStats* out) override {
    return Ask(TierStatsCall{}, "tierStats", out);
  }

 private:
  Clock::time_point Deadline() const {
    return options_.deadline_ms == 0
               ? Clock::time_point::max()
               : Clock::now() + std::chrono::milliseconds(options_.deadline_ms);
  }

  Status CallOn(Connection& conn, net::Call call, Response* reply,
                const Connection::OnProgress& progress,
                const Connection::IsCancelled& cancelled = nullptr) {
    Request request;
    request.id = next_id_.fetch_add(1) + 1;
    request.deadline_ms = options_.deadline_ms;
    request.call = std::move(call);
    return conn.Call(request, Deadline(), reply, progress, cancelled);
  }

  static Status UploadCancelled(const std::string& name, uint64_t sent, uint64_t total) {
    return Status::Cancelled("import of '" + name + "' cancelled during the upload (" +
                             std::to_string(sent) + " of " + std::to_string(total) +
                             " bytes sent); nothing was published");
  }

  // One call on a pooled connection. A read-only call that fails on a reused connection (which
  // the server may have closed for idleness) is tried once more on a fresh one.
  Status RoundTrip(net::Call call, Response* reply,
                   const Connection::OnProgress& progress = nullptr,
                   const Connection::IsCancelled& cancelled = nullptr) {
    const bool read_only =
        std::holds_alternative<QueryCall>(call) || std::holds_alternative<ListCall>(call) ||
        std::holds_alternative<InfoCall>(call) || std::holds_alternative<GetThresholdsCall>(call) ||
        std::holds_alternative<VerifyCall>(call) || std::holds_alternative<StatsCall>(call) ||
        std::holds_alternative<ListPinsCall>(call) || std::holds_alternative<TierStatsCall>(call);
    std::unique_ptr<Connection> conn;
    bool reused = false;
    SQKV_RETURN_IF_ERROR(Acquire(&conn, &reused));
    Status s = CallOn(*conn, read_only ? call : std::move(call), reply, progress, cancelled);
    if (!s.ok() && !s.IsCancelled() && reused && read_only) {
      SQKV_RETURN_IF_ERROR(Connection::Open(host_, port_, options_, &conn));
      s = CallOn(*conn, std::move(call), reply, progress, cancelled);
    }
    SQKV_RETURN_IF_ERROR(s);
    Release(std::move(conn));
    return Status::Ok();
  }

  static Connection::OnProgress ProgressTo(const ProgressFn& fn) {
    if (!fn) return nullptr;
    return [fn](const ProgressReply& p) { fn(p.done, p.total); };
  }

  // A call whose reply carries a body of type T (moved to *out when the status is OK).
  template <typename T>
  Status Ask(net::Call call, const char* what, T* out,
             const Connection::OnProgress& progress = nullptr,
             const Connection::IsCancelled& cancelled = nullptr) {
    Response reply;
    SQKV_RETURN_IF_ERROR(RoundTrip(std::move(call), &reply, progress, cancelled));
    return Take(std::move(reply), what, out);
  }

  // A call whose reply is a status only.
  Status Send(net::Call call) {
    Response reply;
    SQKV_RETURN_IF_ERROR(RoundTrip(std::move(call), &reply));
    return reply.status;
  }

  // The reply's status; when OK, its body of type T moved to *out.
  template <typename T>
  Status Take(Response reply, const char* call, T* out) {
    if (!reply.status.ok()) return reply.status;
    T* body = std::get_if<T>(&reply.body);
    if (body == nullptr) {
      return Status::Internal("server " + data_dir() + " answered " + call + " badly");
    }
    if (out != nullptr) *out = std::move(*body);
    return Status::Ok();
  }

  // Returns the connection to the pool, then `s`.
  Status Done(std::unique_ptr<Connection> conn, Status s) {
    Release(std::move(conn));
    return s;
  }

  Status Acquire(std::unique_ptr<Connection>* out, bool* reused = nullptr) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        *out = std::move(idle_.back());
        idle_.pop_back();
        if (reused != nullptr) *reused = true;
        return Status::Ok();
      }
    }
    if (reused != nullptr) *reused = false;
    return Connection::Open(host_, port_, options_, out);
  }

  void Release(std::unique_ptr<Connection> conn) {
    if (conn->broken()) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.size() < static_cast<size_t>(std::max(1, options_.max_idle_connections))) {
      idle_.push_back(std::move(conn));
    }
  }

  const std::string host_, port_;
  const ClientOptions options_;
  std::atomic<uint64_t> next_id_{1};
  std::mutex mu_;
  std::vector<std::unique_ptr<Connection>> idle_;
};

}  // namespace

Status SplitHostPort(const std::string& host_port, std::string* host, std::string* port) {
  const auto bad = [&host_port](const std::string& why) {
    return Status::InvalidArgument("address '" + host_port + "' " + why +
                                   " (want HOST:PORT, e.g. 127.0.0.1:7781 or [::1]:7781)");
  };
  size_t colon;
  if (!host_port.empty() && host_port[0] == '[') {
    const size_t close = host_port.find(']');
    if (close == std::string::npos || close + 1 >= host_port.size() ||
        host_port[close + 1] != ':') {
      return bad("has a malformed [IPv6] host");
    }
    *host = host_port.substr(1, close - 1);
    colon = close + 1;
  } else {
    colon = host_port.rfind(':');
    if (colon == std::string::npos) return bad("has no port");
    *host = host_port.substr(0, colon);
    if (host->find(':') != std::string::npos) return bad("needs [] around an IPv6 host");
  }
  *port = host_port.substr(colon + 1);
  if (host->empty()) return bad("has no host");
  if (port->empty() || port->size() > kMaxPortDigits ||
      !std::all_of(port->begin(), port->end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      std::stoul(*port) > kMaxPort) {
    return bad("has a bad port");
  }
  return Status::Ok();
}

Status ReadTokenFile(const std::string& path, std::string* token) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return FileError("read token file", path);
  std::ostringstream s;
  s << f.rdbuf();
  std::string t = s.str();
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
  if (t.empty()) return Status::InvalidArgument("token file " + path + " is empty");
  *token = std::move(t);
  return Status::Ok();
}

Status ConnectStore(const std::string& host_port, const ClientOptions& options,
                    std::unique_ptr<Store>* out) {
  std::string host, port;
  SQKV_RETURN_IF_ERROR(SplitHostPort(host_port, &host, &port));
  auto store = std::make_unique<RemoteStore>(host_port, host, port, options);
  SQKV_RETURN_IF_ERROR(store->Connect());
  *out = std::move(store);
  return Status::Ok();
}

Status ConnectStore(const std::string& host_port, const std::string& token,
                    std::unique_ptr<Store>* out) {
  ClientOptions options;
  options.token = token;
  return ConnectStore(host_port, options, out);
}

}  // namespace sqkv::net
