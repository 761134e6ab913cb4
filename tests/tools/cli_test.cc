// The sqkv command line end to end, as a user runs it: synth → import → query → files, JSON
// output, exit codes, and imports killed at any moment leaving the store whole.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "storage/npy.h"
#include "tests/testing/testing.h"

extern char** environ;

namespace sqkv {
namespace {

namespace fs = std::filesystem;

using testing::CmdResult;

std::string Binary() { return testing::SqkvBinary(); }

CmdResult Sqkv(const std::vector<std::string>& args,
               const std::vector<std::string>& extra_env = {}) {
  return testing::RunSqkv(args, extra_env);
}

class CliTest : public ::testing::Test {
 protected:
  std::string Data() const { return dir_.file("data"); }
  testing::ScratchDir dir_;
};

TEST_F(CliTest, SynthImportQueryWritesTheAnswer) {
  const std::string ctx = dir_.file("ctx.safetensors"), q = dir_.file("q.npy");
  CmdResult r = Sqkv({"synth", ctx, "--queries-out", q, "--tokens", "500", "--layers", "2",
                      "--kv-heads", "2", "--q-heads", "4", "-n", "3", "--head-dim", "64"});
  ASSERT_EQ(r.code, 0) << r.err;
  r = Sqkv({"--data", Data(), "import", "doc", ctx, "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto info = nlohmann::json::parse(r.out);
  EXPECT_EQ(info["tokens"], 500);
  EXPECT_EQ(info["layers"], 2);
  EXPECT_EQ(info["dtype"], "bf16");

  const std::string out = dir_.file("out");
  r = Sqkv({"query", "doc", "--data", Data(), "--layer", "1", "--queries", q, "--keep", "0.2",
            "--out", out, "--device", "cpu", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_GE(j["kept_fraction"].get<double>(), 0.2);
  auto o = ReadNpyAsFloat(out + "/output.npy");
  auto l = ReadNpyAsFloat(out + "/lse.npy");
  ASSERT_TRUE(o.ok() && l.ok());
  EXPECT_EQ(o->shape, (std::vector<int64_t>{4, 3, 64}));
  EXPECT_EQ(l->shape, (std::vector<int64_t>{4, 3}));
  for (float x : o->data) ASSERT_TRUE(std::isfinite(x));
  std::ifstream sel_file(out + "/selection.json");
  auto sel = nlohmann::json::parse(sel_file);
  ASSERT_EQ(sel["kv_heads"].size(), 2u);
  for (const auto& h : sel["kv_heads"]) {
    auto tokens = h["tokens"].get<std::vector<int>>();
    EXPECT_GE(tokens.size(), 100u);
    EXPECT_TRUE(std::is_sorted(tokens.begin(), tokens.end()));
  }

  r = Sqkv({"ls", "--data", Data(), "--json"});
  ASSERT_EQ(r.code, 0);
  EXPECT_EQ(nlohmann::json::parse(r.out).size(), 1u);
  r = Sqkv({"rm", "doc", "--data", Data()});
  ASSERT_EQ(r.code, 0) << r.err;
  r = Sqkv({"info", "doc", "--data", Data()});
  EXPECT_EQ(r.code, 3);
  EXPECT_NE(r.err.find("doc"), std::string::npos);
}

TEST_F(CliTest, ErrorsHaveMessagesAndExitCodes) {
  CmdResult r = Sqkv({"--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("import"), std::string::npos);
  for (const char* sub : {"import", "query", "ls", "info", "rm", "synth"}) {
    r = Sqkv({sub, "--help"});
    EXPECT_EQ(r.code, 0) << sub;
  }
  r = Sqkv({"frobnicate"});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("unknown command 'frobnicate'"), std::string::npos) << r.err;
  // Commands that only read never create a store: a mistyped --data is an error.
  const std::string typo = dir_.file("typo-dir");
  for (const char* sub : {"ls", "stats", "verify"}) {
    r = Sqkv({"--data", typo, sub});
    EXPECT_EQ(r.code, 3) << sub;
    EXPECT_NE(r.err.find("no store in"), std::string::npos) << r.err;
  }
  EXPECT_FALSE(fs::exists(typo));
  const std::string bad = dir_.file("bad.safetensors");
  std::ofstream(bad) << "this is not a safetensors file at all";
  r = Sqkv({"--data", Data(), "import", "x", bad});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("sqkv: "), std::string::npos);
  const std::string ctx = dir_.file("c.safetensors"), q = dir_.file("q.npy");
  ASSERT_EQ(Sqkv({"synth", ctx, "--queries-out", q, "--tokens", "64", "--layers", "1"}).code, 0);
  ASSERT_EQ(Sqkv({"--data", Data(), "import", "c", ctx}).code, 0);
  EXPECT_EQ(Sqkv({"--data", Data(), "import", "c", ctx}).code, 4);
  r = Sqkv({"--data", Data(), "query", "c", "--layer", "5", "--queries", q, "--keep", "0.1",
            "--out", dir_.file("o")});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("layer 5"), std::string::npos) << r.err;
  r = Sqkv(
      {"--data", Data(), "query", "c", "--layer", "0", "--queries", q, "--out", dir_.file("o")});
  EXPECT_EQ(r.code, 2);  // neither --keep nor --dense
  r = Sqkv({"--data", Data(), "query", "c", "--layer", "0", "--queries", q, "--keep", "0.1",
            "--dense", "--out", dir_.file("o")});
  EXPECT_EQ(r.code, 2);
  // Out-of-range flags name themselves.
  r = Sqkv({"--data", Data(), "query", "c", "--layer", "0", "--queries", q, "--sparsity", "-0.5",
            "--out", dir_.file("o")});
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("--sparsity must be in (0, 1)"), std::string::npos) << r.err;
  for (const char* l1 : {"-1", "2"}) {
    r = Sqkv({"--data", Data(), "query", "c", "--layer", "0", "--queries", q, "--keep", "0.1",
              "--l1-keep", l1, "--out", dir_.file("o")});
    EXPECT_EQ(r.code, 2) << l1;
    EXPECT_NE(r.err.find("--l1-keep must be in [0, 1]"), std::string::npos) << r.err;
  }
}

// SIGKILL at each named stage of the import: before the catalog batch the context is absent and
// its segment is cleaned up at the next open; after it, the context is whole and queryable.
TEST_F(CliTest, ImportKilledAtEachStageIsAllOrNothing) {
  const std::string ctx = dir_.file("c.safetensors"), q = dir_.file("q.npy");
  ASSERT_EQ(Sqkv({"synth", ctx, "--queries-out", q, "--tokens", "300", "--layers", "2"}).code, 0);
  for (const char* stage : {"segment_written", "segment_published", "published"}) {
    const std::string data = dir_.file(std::string("data-") + stage);
    CmdResult r =
        Sqkv({"--data", data, "import", "c", ctx}, {std::string("SQKV_TEST_CRASH_AT=") + stage});
    EXPECT_EQ(r.code, 128 + SIGKILL) << stage;
    r = Sqkv({"--data", data, "ls", "--json"});
    ASSERT_EQ(r.code, 0) << r.err;
    const bool published = std::string(stage) == "published";
    EXPECT_EQ(nlohmann::json::parse(r.out).size(), published ? 1u : 0u) << stage;
    size_t files = 0;
    for (const auto& e : fs::directory_iterator(data + "/segments")) files += e.is_regular_file();
    EXPECT_EQ(files, published ? 1u : 0u) << stage;
    if (published) {
      r = Sqkv({"--data", data, "query", "c", "--layer", "1", "--queries", q, "--dense", "--out",
                dir_.file("o"), "--device", "cpu"});
      EXPECT_EQ(r.code, 0) << r.err;
    }
  }
}

// Ctrl-C stops an import or a rebuild on the embedded store: exit 130, nothing published, no file
// left; the store works on as before. The test hook raises SIGTERM at a named point, which the
// CLI handles as it does SIGINT (SIGINT may be ignored in a background job running the tests).
TEST_F(CliTest, InterruptedImportOrRebuildPublishesNothing) {
  const std::string ctx = dir_.file("c.safetensors"), q = dir_.file("q.npy");
  ASSERT_EQ(Sqkv({"synth", ctx, "--queries-out", q, "--tokens", "300", "--layers", "2"}).code, 0);
  const std::string data = Data();
  auto segment_files = [&] {
    size_t files = 0;
    if (!fs::exists(data + "/segments")) return files;
    for (const auto& e : fs::directory_iterator(data + "/segments")) files += e.is_regular_file();
    return files;
  };
  for (const char* stage : {"head_written", "segment_written"}) {
    CmdResult r = Sqkv({"--data", data, "import", "c", ctx},
                       {std::string("SQKV_TEST_INTERRUPT_AT=") + stage});
    EXPECT_EQ(r.code, 130) << stage << ": " << r.err;
    EXPECT_NE(r.err.find("nothing was published"), std::string::npos) << r.err;
    r = Sqkv({"--data", data, "ls", "--json"});
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(nlohmann::json::parse(r.out).size(), 0u) << stage;
    EXPECT_EQ(segment_files(), 0u) << stage;
  }
  ASSERT_EQ(Sqkv({"--data", data, "import", "c", ctx}).code, 0);
  CmdResult r = Sqkv({"--data", data, "rebuild", "c", "--levels", "2"},
                     {"SQKV_TEST_INTERRUPT_AT=head_written"});
  EXPECT_EQ(r.code, 130) << r.err;
  EXPECT_NE(r.err.find("rebuild of 'c' cancelled after 1 of 4"), std::string::npos) << r.err;
  r = Sqkv({"--data", data, "info", "c", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["levels"], 1);
  EXPECT_EQ(segment_files(), 1u);
  r = Sqkv({"--data", data, "query", "c", "--layer", "1", "--queries", q, "--dense", "--out",
            dir_.file("o"), "--device", "cpu"});
  EXPECT_EQ(r.code, 0) << r.err;
}

// The source file shrinking under a local import (another process truncating it): the import
// reads layer by layer, so the next layer's read finds the file short and the import fails with
// an I/O error (exit 7) naming the file and the tensor. Nothing is published or left behind, and
// the store is as before: the context imported earlier is listed, verifies and answers queries.
TEST_F(CliTest, SourceShrunkDuringImportFailsAndLeavesTheStoreAsItWas) {
  const std::string kept = dir_.file("kept.safetensors"), ctx = dir_.file("c.safetensors");
  const std::string q = dir_.file("q.npy");
  ASSERT_EQ(Sqkv({"synth", kept, "--queries-out", q, "--tokens", "300", "--layers", "2"}).code, 0);
  ASSERT_EQ(Sqkv({"synth", ctx, "--tokens", "500", "--layers", "3", "--kv-heads", "2"}).code, 0);
  const std::string data = Data();
  ASSERT_EQ(Sqkv({"--data", data, "import", "kept", kept}).code, 0);
  auto segment_files = [&] {
    size_t n = 0;
    for (const auto& e : fs::directory_iterator(data + "/segments")) n += e.is_regular_file();
    return n;
  };
  ASSERT_EQ(segment_files(), 1u);

  CmdResult r =
      Sqkv({"--data", data, "import", "c", ctx}, {"SQKV_TEST_TRUNCATE_AT=head_written:" + ctx});
  EXPECT_EQ(r.code, 7) << r.err;
  for (const std::string& part : {std::string("sqkv: "), ctx, std::string("tensor k.1"),
                                  std::string("file offset"), std::string("now has 4096 bytes")}) {
    EXPECT_NE(r.err.find(part), std::string::npos) << "missing '" << part << "' in " << r.err;
  }
  EXPECT_EQ(fs::file_size(ctx), 4096u);  // the hook did cut it

  r = Sqkv({"--data", data, "ls", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto listed = nlohmann::json::parse(r.out);
  ASSERT_EQ(listed.size(), 1u);
  EXPECT_EQ(listed[0]["name"], "kept");
  EXPECT_EQ(segment_files(), 1u);  // the failed build's temporary segment is gone already
  r = Sqkv({"--data", data, "verify"});
  EXPECT_EQ(r.code, 0) << r.out << r.err;
  r = Sqkv({"--data", data, "query", "kept", "--layer", "1", "--queries", q, "--dense", "--out",
            dir_.file("o"), "--device", "cpu"});
  EXPECT_EQ(r.code, 0) << r.err;
}

// SIGKILL at random moments of a longer import.
TEST_F(CliTest, ImportKilledAtRandomMomentsIsAllOrNothing) {
  const std::string ctx = dir_.file("c.safetensors"), q = dir_.file("q.npy");
  ASSERT_EQ(Sqkv({"synth", ctx, "--queries-out", q, "--tokens", "1000", "--layers", "4",
                  "--kv-heads", "2"})
                .code,
            0);
  std::mt19937_64 rng(testing::FreshSeed());
  const std::string data = Data();
  // One undisturbed import first, to learn how long one takes on this machine now.
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(Sqkv({"--data", data, "import", "timed", ctx}).code, 0);
  const int full_ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count());
  int completed = 1, absent = 0;
  for (int round = 0; round < 8; ++round) {
    const std::string name = "c" + std::to_string(round);
    const std::string bin = Binary();
    std::vector<std::string> argv_s = {bin, "--data", data, "import", name, ctx};
    std::vector<char*> argv;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid;
    ASSERT_EQ(posix_spawn(&pid, bin.c_str(), nullptr, nullptr, argv.data(), environ), 0);
    // Some kills land before the publish, some after.
    std::uniform_int_distribution<int> delay_ms(0, full_ms * 3 / 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    CmdResult r = Sqkv({"--data", data, "ls", "--json"});
    ASSERT_EQ(r.code, 0) << r.err;
    bool present = false;
    for (const auto& c : nlohmann::json::parse(r.out)) present |= c["name"] == name;
    if (present) {
      ++completed;
      r = Sqkv({"--data", data, "query", name, "--layer", "3", "--queries", q, "--dense", "--out",
                dir_.file("o"), "--device", "cpu"});
      EXPECT_EQ(r.code, 0) << r.err;
    } else {
      ++absent;
    }
    size_t files = 0;
    for (const auto& e : fs::directory_iterator(data + "/segments")) files += e.is_regular_file();
    EXPECT_EQ(files, static_cast<size_t>(completed)) << "round " << round;
  }
  std::fprintf(stderr, "import takes %d ms; killed imports: %d completed, %d left nothing\n",
               full_ms, completed - 1, absent);
}

// The lifecycle commands as an operator runs them.
TEST_F(CliTest, RebuildCalibrateVerifyCompactStats) {
  const std::string ctx = dir_.file("c.safetensors"), q = dir_.file("q.npy");
  ASSERT_EQ(Sqkv({"synth", ctx, "--queries-out", q, "--tokens", "1024", "--layers", "2", "--window",
                  "32", "-n", "1"})
                .code,
            0);
  ASSERT_EQ(Sqkv({"--data", Data(), "import", "c", ctx}).code, 0);
  // Imported with window queries: calibrated already, --sparsity works.
  CmdResult r = Sqkv({"--data", Data(), "query", "c", "--layer", "0", "--queries", q, "--sparsity",
                      "0.8", "--out", dir_.file("o"), "--device", "cpu", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const double kept = nlohmann::json::parse(r.out)["kept_fraction"].get<double>();
  EXPECT_GT(kept, 0.0);
  EXPECT_LT(kept, 0.6);
  r = Sqkv(
      {"--data", Data(), "calibrate", "c", "--sparsity", "0.5", "--sparsity", "0.9", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto cal = nlohmann::json::parse(r.out);
  ASSERT_EQ(cal["layers"].size(), 2u);
  EXPECT_EQ(cal["layers"][0]["threshold"].size(), 2u);
  // Two levels; the query reports how many centroids it scored.
  r = Sqkv({"--data", Data(), "rebuild", "c", "--levels", "2", "--centroids", "0.1", "--l1", "0.02",
            "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["levels"], 2);
  // A rebuild changes only what it is given; a bad value is an error, not ignored.
  r = Sqkv({"--data", Data(), "rebuild", "c", "--page-tokens", "32", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto rebuilt = nlohmann::json::parse(r.out);
  EXPECT_EQ(rebuilt["page_tokens"], 32);
  EXPECT_EQ(rebuilt["levels"], 2);
  EXPECT_FLOAT_EQ(rebuilt["centroid_fraction"].get<float>(), 0.1f);
  EXPECT_FLOAT_EQ(rebuilt["l1_fraction"].get<float>(), 0.02f);
  EXPECT_EQ(Sqkv({"--data", Data(), "rebuild", "c", "--page-tokens", "-5"}).code, 2);
  r = Sqkv({"--data", Data(), "query", "c", "--layer", "1", "--queries", q, "--keep", "0.1",
            "--out", dir_.file("o"), "--device", "cpu", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const int scored = nlohmann::json::parse(r.out)["stats"]["centroids_scored"].get<int>();
  EXPECT_GT(scored, 0);
  EXPECT_LT(scored, 2 * 102);  // fewer than every level-2 centroid of both kv heads
  r = Sqkv({"--data", Data(), "stats", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto st = nlohmann::json::parse(r.out);
  EXPECT_EQ(st["contexts"], 1);
  EXPECT_EQ(st["versions"]["garbage"], 0);  // the old version went when the rebuild ended
  // This process's tiers: fresh, with the default bounds.
  EXPECT_EQ(st["tiers"]["index"]["layers_cached"], 0);
  EXPECT_EQ(st["tiers"]["index"]["capacity_bytes"], uint64_t{1} << 30);
  EXPECT_EQ(st["tiers"]["host"]["capacity_bytes"], uint64_t{1} << 30);
  r = Sqkv({"--data", Data(), "verify", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(nlohmann::json::parse(r.out)["ok"].get<bool>());
  // Damage a page: verify names it and exits 5.
  r = Sqkv({"--data", Data(), "info", "c", "--json"});
  const uint64_t version = nlohmann::json::parse(r.out)["version"].get<uint64_t>();
  char name[32];
  std::snprintf(name, sizeof(name), "%016llx.seg", static_cast<unsigned long long>(version));
  const std::string seg = Data() + "/segments/" + name;
  {
    std::fstream f(seg, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096 + 5);
    f.put('\x5a');
    f.seekp(4096 + 6);
    f.put('\x5b');
  }
  r = Sqkv({"--data", Data(), "verify"});
  EXPECT_EQ(r.code, 5);
  EXPECT_NE(r.err.find("page 0"), std::string::npos) << r.err;
  r = Sqkv({"--data", Data(), "compact", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(nlohmann::json::parse(r.out).contains("catalog_bytes_after"));
  for (const char* sub : {"rebuild", "calibrate", "verify", "compact", "stats"}) {
    EXPECT_EQ(Sqkv({sub, "--help"}).code, 0) << sub;
  }
  // Commands that report take --json too (on an undamaged context: pinning reads every page).
  ASSERT_EQ(Sqkv({"--data", Data(), "import", "p", ctx}).code, 0);
  r = Sqkv({"--data", Data(), "pin", "p", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out), (nlohmann::json{{"pinned", "p"}, {"tier", "host"}}));
  r = Sqkv({"--data", Data(), "preload", "p", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["preloaded"], "p");
  r = Sqkv({"--data", Data(), "unpin", "p", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out), (nlohmann::json{{"unpinned", "p"}}));
  r = Sqkv({"--data", Data(), "rm", "c", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out), (nlohmann::json{{"removed", "c"}}));
}

}  // namespace
}  // namespace sqkv
