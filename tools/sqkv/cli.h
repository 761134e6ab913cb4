// Shared plumbing of the sqkv subcommands: global options, store opening, errors → exit codes,
// progress bars and JSON output.
#pragma once

#include <CLI/CLI.hpp>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "api/store.h"

namespace sqkv::cli {

// Exit codes (documented in README.md).
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;  // anything not listed below
inline constexpr int kExitUsage = 2;  // bad arguments or bad input (InvalidArgument)
inline constexpr int kExitNotFound = 3;
inline constexpr int kExitAlreadyExists = 4;
inline constexpr int kExitCorruption = 5;
inline constexpr int kExitUnavailable = 6;  // e.g. --device gpu without a GPU; store locked
inline constexpr int kExitIOError = 7;
inline constexpr int kExitCancelled = 130;  // Ctrl-C stopped an import or rebuild (128 + SIGINT)

struct GlobalOptions {
  std::string data_dir;    // --data, else $SQKV_DATA, else ./sqkv-data
  bool json = false;       // --json where the command supports it
  std::string server;      // --server HOST:PORT: talk to `sqkv serve` instead of opening data_dir
  std::string token_file;  // --token-file F: the server's token (with --server)
};

// Prints "sqkv: <message>" to stderr and returns the exit code for the status.
int Fail(const Status& s);
int ExitCodeFor(const Status& s);

// The store of --data, or with --server a connection to that server (same interface).
// `create`: make the store directory when missing (import, serve); other commands fail with
// NotFound there, so a mistyped --data is an error rather than a new empty store.
Status OpenStore(const GlobalOptions& g, std::unique_ptr<Store>* out, bool create = false);

// Ctrl-C during an import or rebuild: while one of these is alive, the first SIGINT or SIGTERM
// asks the build to stop at its next (layer, kv head) and publish nothing (Fail then exits with
// kExitCancelled; with --server the client closes its connection, and the server stops the
// build); a second one ends the process at once. A signal ignored at start (background jobs of
// scripts, nohup) stays ignored. One at a time per process.
class CancelOnInterrupt {
 public:
  CancelOnInterrupt();
  ~CancelOnInterrupt();  // the previous handlers back
  CancelOnInterrupt(const CancelOnInterrupt&) = delete;
  CancelOnInterrupt& operator=(const CancelOnInterrupt&) = delete;
  // For ImportOptions::cancelled: whether a signal came.
  std::function<bool()> Asked() const;
};

// Test hooks of import and rebuild, from the environment: SQKV_TEST_CRASH_AT=<stage> kills the
// process (SIGKILL) and SQKV_TEST_INTERRUPT_AT=<stage> raises SIGTERM once, at that point of the
// build (ImportOptions::on_stage: head_written, segment_written, segment_published, published);
// SQKV_TEST_TRUNCATE_AT=<stage>:<file> truncates <file> to 4 KiB there, once (the source shrinking
// under an import, which then fails with IOError).
void SetTestHooks(ImportOptions* options);

// Prints to stderr a one-line bar, redrawn in place, when stderr is a terminal; silent otherwise.
class ProgressBar {
 public:
  explicit ProgressBar(std::string label);
  void Update(int done, int total);
  void Finish();

 private:
  std::string label_;
  bool enabled_;
  int last_permille_ = -1;
};

nlohmann::json ContextJson(const ContextInfo& c);

// Each subcommand registers itself on the app and returns the function that runs it.
using Runner = std::function<int()>;
void AddImport(CLI::App& app, GlobalOptions& g, Runner* run);
void AddQuery(CLI::App& app, GlobalOptions& g, Runner* run);
void AddCatalogCommands(CLI::App& app, GlobalOptions& g, Runner* ls, Runner* info, Runner* rm);
void AddSynth(CLI::App& app, GlobalOptions& g, Runner* run);
void AddServe(CLI::App& app, GlobalOptions& g, Runner* run);
// rebuild, calibrate, verify, compact, stats: registered by name.
void AddAdminCommands(CLI::App& app, GlobalOptions& g, std::map<std::string, Runner>* runners);

}  // namespace sqkv::cli
