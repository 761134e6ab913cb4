#include "api/net/session_calls.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "api/net/server_impl.h"

namespace sqkv::net {

// One import upload: a file being written under the server's upload directory. Destroying it
// (when imported, abandoned, or its connection closes) removes the file.
struct Upload {
  std::string name;
  std::string dir, path;
  ImportOptions options;
  uint64_t total = 0;
  uint64_t received = 0;
  int fd = -1;

  ~Upload() { Discard(); }

  // Closes and removes the file (idempotent).
  void Discard() {
    if (fd >= 0) ::close(fd);
    fd = -1;
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }
};

namespace {

using Clock = std::chrono::steady_clock;

// How often a running import reports progress.
constexpr auto kProgressInterval = std::chrono::milliseconds(250);
constexpr char kDefaultUploadName[] = "upload.safetensors";
// The answer to a call whose deadline passed. The call is not started after its deadline; one
// already running goes on to its end, except an import or rebuild, which is cancelled.
constexpr char kDeadlineExceeded[] =
    "deadline exceeded (a query stops at its next kv head or block of rows, an import or rebuild "
    "at its next (layer, kv head), publishing nothing; other calls already running run to their "
    "end)";

Status Errno(const std::string& what) {
  return Status::IOError(what + ": " + std::strerror(errno));
}

Status CreateUploadFile(Upload* up) {
  std::error_code ec;
  std::filesystem::create_directories(up->dir, ec);
  if (ec) return Status::IOError("create " + up->dir + ": " + ec.message());
  up->fd = ::open(up->path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (up->fd < 0) return Errno("create " + up->path);
  return Status::Ok();
}

Status WriteAll(int fd, const char* data, size_t size, uint64_t offset, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::pwrite(fd, data, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("write " + path);
    }
    data += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

CallResult Failed(Status s) {
  CallResult r;
  r.outcome.status = std::move(s);
  return r;
}

// A call on the store, ready to run on a worker: one of the two functions is set.
struct StoreCall {
  std::function<Outcome()> plain;
  LongCall long_call;
};

// Moves the call's arguments into the function that runs it (which may outlive the request when
// its deadline passes).
StoreCall MakeStoreCall(Store* store, Call& call) {
  StoreCall out;
  if (auto* q = std::get_if<QueryCall>(&call)) {
    auto c = std::make_shared<QueryCall>(std::move(*q));
    // A long call (it reports no progress), so that a query abandoned at its deadline stops
    // (QueryOptions::cancelled) rather than running to its end on a worker: two clients'
    // abandoned dense queries had kept every later call waiting for 17 s, and a stop for 22 s. A
    // query in flight when the server stops still finishes and is answered.
    out.long_call = [store, c](const LongCallHooks& hooks) {
      Outcome o;
      QueryResult result;
      QueryOptions options = c->options;
      options.cancelled = hooks.abandoned;
      o.status = store->Query(c->name, c->layer, c->q.data(), c->q_heads, c->n, c->head_dim,
                              options, &result);
      if (o.status.ok()) o.body = std::move(result);
      return o;
    };
  } else if (std::holds_alternative<ListCall>(call)) {
    out.plain = [store]() {
      Outcome o;
      std::vector<ContextInfo> all;
      o.status = store->List(&all);
      if (o.status.ok()) o.body = std::move(all);
      return o;
    };
  } else if (auto* info = std::get_if<InfoCall>(&call)) {
    out.plain = [store, name = std::move(info->name)]() {
      Outcome o;
      ContextInfo c;
      o.status = store->Info(name, &c);
      if (o.status.ok()) o.body = std::move(c);
      return o;
    };
  } else if (auto* rm = std::get_if<RemoveCall>(&call)) {
    out.plain = [store, name = std::move(rm->name)]() { return Outcome{store->Remove(name), {}}; };
  } else if (auto* rb = std::get_if<RebuildCall>(&call)) {
    out.long_call = [store, c = std::move(*rb)](const LongCallHooks& hooks) {
      Outcome o;
      ImportOptions options = c.options;
      options.progress = hooks.progress;
      options.cancelled = hooks.cancelled;
      ContextInfo info;
      o.status = store->Rebuild(c.name, options, &info);
      if (o.status.ok()) o.body = std::move(info);
      return o;
    };
  } else if (auto* cal = std::get_if<CalibrateCall>(&call)) {
    auto c = std::make_shared<CalibrateCall>(std::move(*cal));
    out.plain = [store, c]() {
      return Outcome{
          store->Calibrate(c->name, c->use_stored_queries ? nullptr : &c->queries, c->sparsities),
          {}};
    };
  } else if (auto* th = std::get_if<GetThresholdsCall>(&call)) {
    out.plain = [store, c = std::move(*th)]() {
      Outcome o;
      Thresholds t;
      o.status = store->GetThresholds(c.name, c.layer, &t);
      if (o.status.ok()) o.body = std::move(t);
      return o;
    };
  } else if (auto* v = std::get_if<VerifyCall>(&call)) {
    out.long_call = [store, name = std::move(v->name)](const LongCallHooks& hooks) {
      Outcome o;
      VerifyReport rep;
      o.status = store->Verify(name, hooks.progress, &rep);
      if (o.status.ok()) o.body = std::move(rep);
      return o;
    };
  } else if (std::holds_alternative<CompactCall>(call)) {
    out.plain = [store]() {
      Outcome o;
      CompactReport rep;
      o.status = store->Compact(&rep);
      if (o.status.ok()) o.body = rep;
      return o;
    };
  } else if (std::holds_alternative<StatsCall>(call)) {
    out.plain = [store]() {
      Outcome o;
      StoreStats st;
      o.status = store->Stats(&st);
      if (o.status.ok()) o.body = st;
      return o;
    };
  } else if (auto* pin = std::get_if<PinCall>(&call)) {
    out.plain = [store, c = std::move(*pin)]() { return Outcome{store->Pin(c.name, c.tier), {}}; };
  } else if (auto* unpin = std::get_if<UnpinCall>(&call)) {
    out.plain = [store, name = std::move(unpin->name)]() {
      return Outcome{store->Unpin(name), {}};
    };
  } else if (auto* pre = std::get_if<PreloadCall>(&call)) {
    out.plain = [store, c = std::move(*pre)]() {
      return Outcome{store->Preload(c.name, c.tier), {}};
    };
  } else if (std::holds_alternative<ListPinsCall>(call)) {
    out.plain = [store]() {
      Outcome o;
      PinList pins;
      o.status = store->ListPins(&pins);
      if (o.status.ok()) o.body = std::move(pins);
      return o;
    };
  } else if (std::holds_alternative<TierStatsCall>(call)) {
    out.plain = [store]() {
      Outcome o;
      TierStats t;
      o.status = store->GetTierStats(&t);
      if (o.status.ok()) o.body = std::move(t);
      return o;
    };
  } else {
    out.plain = []() { return Outcome{Status::Internal("call not served by a worker"), {}}; };
  }
  return out;
}

}  // namespace

SessionCalls::SessionCalls(ServerImpl* server, boost::asio::any_io_executor ex)
    : server_(server), ex_(std::move(ex)) {}

SessionCalls::~SessionCalls() = default;

std::shared_ptr<WorkerCall> SessionCalls::Post(std::function<Outcome()> fn,
                                               Clock::time_point deadline) {
  ServerImpl* server = server_;
  return WorkerCall::Post(server_->workers(), ex_, std::move(fn), deadline,
                          [server] { return server->stopping(); });
}

boost::asio::awaitable<void> SessionCalls::Settle() {
  if (abandoned_) {
    co_await abandoned_->WaitUntil(Clock::time_point::max());
    abandoned_.reset();
  }
}

boost::asio::awaitable<CallResult> SessionCalls::Await(const std::function<Outcome()>& fn,
                                                       Clock::time_point deadline) {
  auto call = Post(fn, deadline);
  CallResult r;
  if (!co_await call->WaitUntil(deadline)) {
    abandoned_ = call;
    r.deadline_exceeded = true;
    r.outcome.status = Status::Unavailable(kDeadlineExceeded);
    co_return r;
  }
  r.outcome = std::move(call->outcome());
  co_return r;
}

boost::asio::awaitable<CallResult> SessionCalls::Run(Request& request, Clock::time_point deadline,
                                                     ProgressSender& progress,
                                                     const PeerEof& peer_eof) {
  // Uploads keep state on the connection; every other call is one store call on a worker.
  // (Arguments of co_await expressions are named variables throughout: GCC 12 mishandles some
  // temporaries that live across a suspension.)
  CallResult r;
  if (auto* begin = std::get_if<ImportBeginCall>(&request.call)) {
    r = co_await ImportBegin(*begin, deadline);
  } else if (auto* chunk = std::get_if<ImportChunkCall>(&request.call)) {
    r = co_await ImportChunk(*chunk, deadline);
  } else if (auto* end = std::get_if<ImportEndCall>(&request.call)) {
    r = co_await ImportEnd(*end, deadline, progress, peer_eof);
  } else {
    StoreCall call = MakeStoreCall(server_->store(), request.call);
    if (call.long_call) {
      r = co_await AwaitLong(call.long_call, deadline, progress, peer_eof);
    } else {
      r = co_await Await(call.plain, deadline);
    }
  }
  co_return r;
}

boost::asio::awaitable<CallResult> SessionCalls::ImportBegin(ImportBeginCall& call,
                                                             Clock::time_point deadline) {
  if (Status s = ValidateContextName(call.name); !s.ok()) co_return Failed(s);
  if (call.total_bytes > server_->options().max_upload_bytes) {
    co_return Failed(Status::InvalidArgument("upload of " + std::to_string(call.total_bytes) +
                                             " bytes exceeds the server's limit of " +
                                             std::to_string(server_->options().max_upload_bytes)));
  }
  if (uploads_.size() >= kMaxUploads) {
    co_return Failed(Status::Unavailable("too many uploads open on this connection"));
  }
  auto up = std::make_shared<Upload>();
  const uint64_t id = server_->NextUploadId();
  up->name = call.name;
  up->options = call.options;
  // The context's source is the client's file name (importBegin.fileName), not the upload path.
  up->options.source = call.file_name.empty() ? kDefaultUploadName : call.file_name;
  up->total = call.total_bytes;
  up->dir = server_->upload_dir() + "/up-" + std::to_string(id);
  up->path = up->dir + "/" + (call.file_name.empty() ? kDefaultUploadName : call.file_name);
  const std::function<Outcome()> create = [up]() {
    return Outcome{CreateUploadFile(up.get()), {}};
  };
  CallResult r = co_await Await(create, deadline);
  if (!r.outcome.status.ok()) co_return r;
  uploads_[id] = up;
  r.outcome.body = ImportBeginReply{id, server_->options().chunk_bytes};
  co_return r;
}

boost::asio::awaitable<CallResult> SessionCalls::ImportChunk(ImportChunkCall& call,
                                                             Clock::time_point deadline) {
  auto it = uploads_.find(call.upload_id);
  if (it == uploads_.end()) {
    co_return Failed(
        Status::NotFound("no upload " + std::to_string(call.upload_id) + " on this connection"));
  }
  std::shared_ptr<Upload> up = it->second;
  Status bad;
  if (call.offset != up->received) {
    bad = Status::InvalidArgument("chunk at offset " + std::to_string(call.offset) + ", expected " +
                                  std::to_string(up->received));
  } else if (call.data.size() > server_->options().chunk_bytes) {
    bad = Status::InvalidArgument("chunk of " + std::to_string(call.data.size()) +
                                  " bytes exceeds the chunk size");
  } else if (call.data.size() > up->total - up->received) {
    bad = Status::InvalidArgument("chunk runs past the announced upload size");
  }
  if (!bad.ok()) {
    uploads_.erase(it);  // a broken upload is not resumable
    co_return Failed(bad);
  }
  auto data = std::make_shared<std::string>(std::move(call.data));
  const uint64_t offset = up->received;
  const std::function<Outcome()> write = [up, data, offset]() {
    return Outcome{WriteAll(up->fd, data->data(), data->size(), offset, up->path), {}};
  };
  CallResult r = co_await Await(write, deadline);
  if (!r.outcome.status.ok()) {
    uploads_.erase(call.upload_id);  // possibly still being written: the worker holds it
    co_return r;
  }
  up->received += data->size();
  server_->metrics().upload_bytes.fetch_add(data->size());
  co_return r;
}

boost::asio::awaitable<CallResult> SessionCalls::ImportEnd(const ImportEndCall& call,
                                                           Clock::time_point deadline,
                                                           ProgressSender& progress,
                                                           const PeerEof& peer_eof) {
  auto it = uploads_.find(call.upload_id);
  if (it == uploads_.end()) {
    co_return Failed(
        Status::NotFound("no upload " + std::to_string(call.upload_id) + " on this connection"));
  }
  std::shared_ptr<Upload> up = std::move(it->second);
  uploads_.erase(it);
  if (up->received != up->total) {
    co_return Failed(Status::InvalidArgument("upload ended after " + std::to_string(up->received) +
                                             " of " + std::to_string(up->total) + " bytes"));
  }
  Store* store = server_->store();
  const LongCall import = [store, up](const LongCallHooks& hooks) {
    Outcome o;
    const int fd = up->fd;
    up->fd = -1;
    if (::close(fd) != 0) {
      o.status = Errno("close " + up->path);
      up->Discard();
      return o;
    }
    ImportOptions options = up->options;
    options.progress = hooks.progress;
    options.cancelled = hooks.cancelled;
    ContextInfo info;
    o.status = store->Import(up->name, up->path, options, &info);
    if (o.status.ok()) {
      o.body = std::move(info);
    } else if (!options.source.empty()) {
      // Errors name the client's file, as the embedded store would, not the upload's path.
      std::string m = o.status.message();
      for (size_t at = m.find(up->path); at != std::string::npos;
           at = m.find(up->path, at + options.source.size())) {
        m.replace(at, up->path.size(), options.source);
      }
      o.status = o.status.WithMessage(std::move(m));
    }
    up->Discard();  // before the answer: nothing of the upload is left once the client hears
    return o;
  };
  up.reset();
  CallResult r = co_await AwaitLong(import, deadline, progress, peer_eof);
  co_return r;
}

boost::asio::awaitable<CallResult> SessionCalls::AwaitLong(const LongCall& fn,
                                                           Clock::time_point deadline,
                                                           ProgressSender& progress,
                                                           const PeerEof& peer_eof) {
  struct Shared {
    std::atomic<int> done{0}, total{0};
    std::atomic<bool> stop{false};
  };
  auto shared = std::make_shared<Shared>();
  ServerImpl* server = server_;
  const std::function<Outcome()> run = [fn, shared, server]() {
    LongCallHooks hooks;
    hooks.progress = [shared](int done, int total) {
      shared->total.store(total, std::memory_order_relaxed);
      shared->done.store(done, std::memory_order_relaxed);
    };
    hooks.cancelled = [shared, server]() {
      return shared->stop.load(std::memory_order_relaxed) || server->stopping();
    };
    hooks.abandoned = [shared]() { return shared->stop.load(std::memory_order_relaxed); };
    return fn(hooks);
  };
  auto call = Post(run, deadline);
  // Leaves the call to the workers, told to stop (see Run).
  auto abandon = [&] {
    shared->stop.store(true, std::memory_order_relaxed);
    abandoned_ = call;
  };
  int sent = -1;
  bool eof = false;
  CallResult r;
  for (;;) {
    const auto wake = std::min(deadline, Clock::now() + kProgressInterval);
    if (co_await call->WaitUntil(wake)) break;
    if (Clock::now() >= deadline) {
      abandon();
      r.deadline_exceeded = true;
      r.outcome.status = Status::Unavailable(kDeadlineExceeded);
      co_return r;
    }
    // A client whose side is closed has gone, or only half-closed the connection and still
    // reads: progress is then sent at every look, changed or not. To a gone client the first
    // write after its close still succeeds, the next one fails.
    eof = eof || (peer_eof && peer_eof());
    const int done = shared->done.load(std::memory_order_relaxed);
    const int total = shared->total.load(std::memory_order_relaxed);
    if (total > 0 && (done != sent || eof)) {
      sent = done;
      const ProgressReply report{done, total};
      const bool delivered = co_await progress(report);
      if (!delivered) {
        abandon();
        r.connection_lost = true;
        r.outcome.status = Status::Cancelled("the client went away");  // for the metrics only
        co_return r;
      }
    }
  }
  r.outcome = std::move(call->outcome());
  if (r.outcome.status.IsCancelled() && server_->stopping()) {
    // Not the client's doing: Unavailable, as for a call the stopping server did not start.
    r.outcome.status =
        Status::Unavailable("the server is stopping: " + r.outcome.status.message());
  }
  co_return r;
}

}  // namespace sqkv::net
