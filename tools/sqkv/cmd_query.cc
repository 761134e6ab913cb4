#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "storage/file_util.h"
#include "storage/npy.h"
#include "tools/sqkv/cli.h"

namespace sqkv::cli {
namespace {

struct QueryArgs {
  std::string name, queries, out_dir, device = "auto";
  int layer = -1;
  float keep = -1.f;
  float sparsity = -1.f;
  bool sparsity_given = false;
  float l1_keep = 0.f;
  bool dense = false;
  bool stats = false;
  bool compare_dense = false;
};

Status WriteSelection(const std::string& path, const QueryResult& r) {
  nlohmann::json heads = nlohmann::json::array();
  for (size_t h = 0; h < r.selected_tokens.size(); ++h) {
    heads.push_back({{"kv_head", h}, {"tokens", r.selected_tokens[h]}});
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    f << nlohmann::json{{"kv_heads", heads}}.dump() << "\n";
    if (!f) return Status::IOError("write " + tmp);
  }
  return RenameDurable(tmp, path);
}

nlohmann::json StatsJson(const QueryStats& s) {
  return {{"device", s.device},
          {"tokens_selected", s.tokens_selected},
          {"pages_selected", s.pages_selected},
          {"centroids_scored", s.centroids_scored},
          {"pages_from_disk", s.pages_from_disk},
          {"pages_from_host", s.pages_from_host},
          {"pages_from_device", s.pages_from_device},
          {"disk_bytes_read", s.disk_bytes_read},
          {"total_ms", s.total_ms}};
}

int RunQuery(const QueryArgs& a, const GlobalOptions& g) {
  QueryOptions options;
  if (!ParseDevice(a.device, &options.device)) {
    return Fail(Status::InvalidArgument("--device must be auto, gpu or cpu"));
  }
  if (!(a.l1_keep >= 0.f && a.l1_keep <= 1.f)) {
    return Fail(Status::InvalidArgument("--l1-keep must be in [0, 1]"));
  }
  options.select.l1_keep_fraction = a.l1_keep;
  if (a.dense) {
    options.select.mode = SelectOptions::Mode::kDense;
  } else if (a.sparsity_given) {
    if (!(a.sparsity > 0.f && a.sparsity < 1.f)) {
      return Fail(Status::InvalidArgument("--sparsity must be in (0, 1)"));
    }
    options.sparsity = a.sparsity;
  } else {
    if (!(a.keep >= 0.f && a.keep <= 1.f)) {
      return Fail(Status::InvalidArgument("--keep must be in [0, 1]"));
    }
    options.select.mode = SelectOptions::Mode::kKeepFraction;
    options.select.keep_fraction = a.keep;
  }
  options.want_selection = true;
  auto q = ReadNpyAsFloat(a.queries);
  if (!q.ok()) return Fail(q.status());
  if (q->shape.size() != 3) {
    return Fail(
        Status::InvalidArgument(a.queries + ": queries must be 3-D (q_heads, n, head_dim)"));
  }
  const int q_heads = static_cast<int>(q->shape[0]), n = static_cast<int>(q->shape[1]),
            d = static_cast<int>(q->shape[2]);
  std::unique_ptr<Store> store;
  if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
  QueryResult r;
  if (Status s = store->Query(a.name, a.layer, q->data.data(), q_heads, n, d, options, &r);
      !s.ok()) {
    return Fail(s);
  }
  if (Status s = EnsureDir(a.out_dir); !s.ok()) return Fail(s);
  const std::string out = a.out_dir + "/output.npy", lse = a.out_dir + "/lse.npy",
                    sel = a.out_dir + "/selection.json";
  if (Status s = WriteNpy(out, r.output.data(), {q_heads, n, d}); !s.ok()) return Fail(s);
  if (Status s = WriteNpy(lse, r.lse.data(), {q_heads, n}); !s.ok()) return Fail(s);
  if (Status s = WriteSelection(sel, r); !s.ok()) return Fail(s);

  ContextInfo info;
  if (Status s = store->Info(a.name, &info); !s.ok()) return Fail(s);
  const double kept = static_cast<double>(r.stats.tokens_selected) /
                      (static_cast<double>(info.tokens) * info.kv_heads);
  nlohmann::json j = {
      {"context", a.name}, {"layer", a.layer},           {"q_heads", q_heads}, {"n", n},
      {"head_dim", d},     {"kept_fraction", kept},      {"output", out},      {"lse", lse},
      {"selection", sel},  {"stats", StatsJson(r.stats)}};
  if (a.compare_dense && !a.dense) {
    QueryOptions dense = options;
    dense.select.mode = SelectOptions::Mode::kDense;
    dense.sparsity = -1.f;
    dense.want_selection = false;
    QueryResult full;
    if (Status s = store->Query(a.name, a.layer, q->data.data(), q_heads, n, d, dense, &full);
        !s.ok()) {
      return Fail(s);
    }
    double num = 0, den = 0, mass = 0;
    for (size_t i = 0; i < full.output.size(); ++i) {
      num += (r.output[i] - full.output[i]) * static_cast<double>(r.output[i] - full.output[i]);
      den += static_cast<double>(full.output[i]) * full.output[i];
    }
    for (size_t i = 0; i < full.lse.size(); ++i) mass += std::exp(r.lse[i] - full.lse[i]);
    j["vs_dense"] = {{"relative_error", std::sqrt(num / std::max(den, 1e-300))},
                     {"attention_mass_kept", mass / full.lse.size()},
                     {"dense_ms", full.stats.total_ms}};
  }
  if (g.json) {
    std::printf("%s\n", j.dump(2).c_str());
  } else if (a.stats) {
    std::printf("%s\n", StatsJson(r.stats).dump().c_str());
  } else {
    std::printf(
        "%s layer %d: %d query heads x %d tokens on %s, kept %.1f%% of keys "
        "(%lld pages, %lld from disk), %.2f ms\n",
        a.name.c_str(), a.layer, q_heads, n, r.stats.device.c_str(), 100 * kept,
        static_cast<long long>(r.stats.pages_selected),
        static_cast<long long>(r.stats.pages_from_disk), r.stats.total_ms);
    if (j.contains("vs_dense")) {
      std::printf("  vs dense: relative error %.2e, attention mass kept %.4f (dense %.2f ms)\n",
                  j["vs_dense"]["relative_error"].get<double>(),
                  j["vs_dense"]["attention_mass_kept"].get<double>(),
                  j["vs_dense"]["dense_ms"].get<double>());
    }
    std::printf("  wrote %s, %s, %s\n", out.c_str(), lse.c_str(), sel.c_str());
  }
  return kExitOk;
}

}  // namespace

void AddQuery(CLI::App& app, GlobalOptions& g, Runner* run) {
  auto* cmd = app.add_subcommand("query", "Attention of query vectors over one layer of a context");
  auto a = std::make_shared<QueryArgs>();
  cmd->add_option("name", a->name, "Context name")->required();
  cmd->add_option("--layer", a->layer, "Layer")->required();
  cmd->add_option("--queries", a->queries, "Queries .npy (q_heads, n, head_dim), f32 or f16")
      ->required()
      ->check(CLI::ExistingFile);
  auto* keep =
      cmd->add_option("--keep", a->keep, "Keep whole clusters until this fraction of keys");
  auto* dense = cmd->add_flag("--dense", a->dense, "Attend to every key");
  auto* sparsity = cmd->add_option("--sparsity", a->sparsity,
                                   "Keep clusters above the calibrated threshold for this target "
                                   "sparsity (needs calibration)");
  keep->excludes(dense);
  dense->excludes(keep);
  sparsity->excludes(keep)->excludes(dense);
  cmd->add_option("--l1-keep", a->l1_keep,
                  "Hierarchical indexes: fraction of keys under the level-1 parents kept before "
                  "their children are scored (default: min(1, 3 x keep), never below keep; "
                  "with --sparsity every parent, as the thresholds were calibrated)");
  cmd->add_option("--out", a->out_dir, "Directory for output.npy, lse.npy, selection.json")
      ->required();
  cmd->add_option("--device", a->device, "auto, gpu or cpu")->capture_default_str();
  cmd->add_flag("--stats", a->stats, "Print the query's counters as JSON");
  cmd->add_flag("--compare-dense", a->compare_dense,
                "Also run dense attention and report the error of the sparse answer");
  cmd->add_flag("--json", g.json, "Print a JSON summary");
  *run = [a, &g, keep, dense, sparsity]() {
    if (keep->count() == 0 && dense->count() == 0 && sparsity->count() == 0) {
      return Fail(Status::InvalidArgument("give --keep F, --sparsity S or --dense"));
    }
    a->sparsity_given = sparsity->count() > 0;
    return RunQuery(*a, g);
  };
}

}  // namespace sqkv::cli
