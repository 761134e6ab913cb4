// rebuild, calibrate, verify, compact, stats.
#include <cstdio>

#include "storage/safetensors.h"
#include "tools/sqkv/cli.h"

namespace sqkv::cli {
namespace {

// Reads q.<layer> tensors (q_heads, window, head_dim) of every layer from a safetensors file.
Status ReadCalibrationFile(const std::string& path, int layers, std::vector<WindowQueries>* out) {
  auto file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  out->assign(layers, WindowQueries());
  for (int l = 0; l < layers; ++l) {
    const std::string name = "q." + std::to_string(l);
    const TensorInfo* t = (*file)->Find(name);
    if (t == nullptr) return Status::InvalidArgument(path + ": tensor " + name + " is missing");
    if (t->shape.size() != 3)
      return Status::InvalidArgument(path + ": tensor " + name + " is not 3-D");
    WindowQueries& w = (*out)[l];
    w.q_heads = static_cast<int32_t>(t->shape[0]);
    w.window = static_cast<int32_t>(t->shape[1]);
    w.head_dim = static_cast<int32_t>(t->shape[2]);
    w.data.resize(t->num_elements());
    SQKV_RETURN_IF_ERROR((*file)->ReadFloat(*t, w.data.data()));
  }
  return Status::Ok();
}

nlohmann::json StatsJson(const StoreStats& s) {
  return {{"contexts", s.contexts},
          {"keys", s.keys},
          {"bytes",
           {{"segments", s.segment_bytes},
            {"indexes", s.index_bytes},
            {"garbage_segments", s.garbage_segment_bytes},
            {"catalog", s.catalog_bytes}}},
          {"versions", {{"live", s.live_versions}, {"garbage", s.garbage_versions}}},
          {"calibrated_contexts", s.calibrated_contexts}};
}

// The tiers of the store that answered: the server's (with --server, since it started) or this
// process's (fresh: capacities, nothing cached yet).
nlohmann::json TiersJson(const TierStats& t) {
  return {
      {"host",
       {{"hits", t.host_hits},
        {"misses", t.host_misses},
        {"evictions", t.host_evictions},
        {"bytes_in_use", t.host_bytes_in_use},
        {"pinned_bytes", t.host_pinned_bytes},
        {"capacity_bytes", t.host_capacity_bytes}}},
      {"disk",
       {{"reads", t.disk_reads}, {"bytes", t.disk_bytes}, {"direct_bytes", t.disk_direct_bytes}}},
      {"device",
       {{"layers_resident", t.device_layers_resident},
        {"layers_pinned", t.device_layers_pinned},
        {"pool_bytes_used", t.device_pool_bytes_used},
        {"pool_bytes", t.device_pool_bytes},
        {"hits", t.device_hits},
        {"misses", t.device_misses},
        {"bytes_uploaded", t.device_bytes_uploaded},
        {"pages_evicted", t.device_pages_evicted}}},
      {"index",
       {{"layers_cached", t.index_layers_cached},
        {"bytes_cached", t.index_bytes_cached},
        {"capacity_bytes", t.index_capacity_bytes},
        {"layers_decoded", t.index_layers_decoded},
        {"layers_evicted", t.index_layers_evicted}}}};
}

}  // namespace

void AddAdminCommands(CLI::App& app, GlobalOptions& g, std::map<std::string, Runner>* runners) {
  // rebuild
  {
    auto* cmd = app.add_subcommand("rebuild",
                                   "Re-cluster a context with new parameters as a new version, "
                                   "swapped in atomically");
    struct Args {
      std::string name;
      ImportOptions options;
      int page_tokens = 0;
    };
    auto a = std::make_shared<Args>();
    cmd->add_option("name", a->name, "Context name")->required();
    // Every index parameter not given keeps the context's current value.
    auto* centroids = cmd->add_option("--centroids", a->options.centroid_fraction,
                                      "Centroids per kv head / tokens (default: unchanged)");
    auto* levels =
        cmd->add_option("--levels", a->options.levels, "Index levels, 1 or 2 (default: unchanged)");
    auto* l1 = cmd->add_option("--l1", a->options.l1_fraction,
                               "Level-1 centroids / tokens with 2 levels (default: unchanged, "
                               "else 0.01)");
    auto* page_tokens = cmd->add_option("--page-tokens", a->page_tokens,
                                        "Token slots per page (default: unchanged)");
    cmd->add_option("--iterations", a->options.kmeans_iterations, "K-means iterations")
        ->capture_default_str();
    auto kmeans_device = std::make_shared<std::string>("auto");
    cmd->add_option("--kmeans-device", *kmeans_device, "Where K-means runs: auto, gpu or cpu")
        ->capture_default_str();
    cmd->add_flag("--json", g.json, "Print the new version as JSON");
    (*runners)["rebuild"] = [a, &g, kmeans_device, centroids, levels, l1, page_tokens]() {
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      ImportOptions o = a->options;
      if (!ParseDevice(*kmeans_device, &o.kmeans_device)) {
        return Fail(Status::InvalidArgument("--kmeans-device must be auto, gpu or cpu"));
      }
      ContextInfo old;
      if (Status s = store->Info(a->name, &old); !s.ok()) return Fail(s);
      if (centroids->count() == 0) o.centroid_fraction = old.centroid_fraction;
      if (levels->count() == 0) o.levels = old.levels;
      if (l1->count() == 0 && old.levels == 2) o.l1_fraction = old.l1_fraction;
      if (page_tokens->count() > 0) {
        o.page_tokens = a->page_tokens;  // the store refuses bad values
      } else {
        o.page_tokens = old.page_tokens;
      }
      // The rebuild recalibrates from the stored calibration queries. A context calibrated with
      // `calibrate --queries FILE` by an older build has thresholds but not their queries.
      Thresholds before;
      const bool calibrated = store->GetThresholds(a->name, 0, &before).ok();
      ProgressBar bar("rebuild " + a->name);
      o.progress = [&bar](int d, int t) { bar.Update(d, t); };
      const CancelOnInterrupt interrupt;
      o.cancelled = interrupt.Asked();
      SetTestHooks(&o);
      ContextInfo info;
      Status s = store->Rebuild(a->name, o, &info);
      bar.Finish();
      if (!s.ok()) return Fail(s);
      Thresholds after;
      if (calibrated && !store->GetThresholds(a->name, 0, &after).ok()) {
        std::fprintf(stderr,
                     "note: %s was calibrated with queries it does not store; run `sqkv calibrate "
                     "%s --queries FILE` again before using --sparsity\n",
                     a->name.c_str(), a->name.c_str());
      }
      if (g.json) {
        std::printf("%s\n", ContextJson(info).dump(2).c_str());
      } else {
        std::printf("rebuilt %s: version %llu -> %llu, %d level(s), centroids %.3f, %.2f s\n",
                    a->name.c_str(), static_cast<unsigned long long>(old.version),
                    static_cast<unsigned long long>(info.version), info.levels,
                    info.centroid_fraction, info.build_seconds);
      }
      return kExitOk;
    };
  }
  // calibrate
  {
    auto* cmd = app.add_subcommand(
        "calibrate", "Calibrate per-layer thresholds for --sparsity from window queries");
    struct Args {
      std::string name, queries;
      std::vector<float> sparsities;
    };
    auto a = std::make_shared<Args>();
    cmd->add_option("name", a->name, "Context name")->required();
    cmd->add_option("--queries", a->queries,
                    "safetensors with q.<layer> (q_heads, window, head_dim) for every layer "
                    "(default: the window queries stored at import)")
        ->check(CLI::ExistingFile);
    cmd->add_option("--sparsity", a->sparsities,
                    "Target sparsities (default: 0.5 0.6 0.7 0.75 0.8 0.85 0.9 0.95)");
    cmd->add_flag("--json", g.json, "Print the thresholds as JSON");
    (*runners)["calibrate"] = [a, &g]() {
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      ContextInfo info;
      if (Status s = store->Info(a->name, &info); !s.ok()) return Fail(s);
      std::vector<float> levels = a->sparsities.empty() ? DefaultSparsities() : a->sparsities;
      std::sort(levels.begin(), levels.end());
      std::vector<WindowQueries> queries;
      if (!a->queries.empty()) {
        if (Status s = ReadCalibrationFile(a->queries, info.layers, &queries); !s.ok())
          return Fail(s);
      }
      if (Status s = store->Calibrate(a->name, a->queries.empty() ? nullptr : &queries, levels);
          !s.ok()) {
        return Fail(s);
      }
      nlohmann::json layers = nlohmann::json::array();
      for (int l = 0; l < info.layers; ++l) {
        Thresholds t;
        if (Status s = store->GetThresholds(a->name, l, &t); !s.ok()) return Fail(s);
        layers.push_back({{"layer", l}, {"sparsity", t.sparsity}, {"threshold", t.threshold}});
      }
      if (g.json) {
        std::printf("%s\n",
                    nlohmann::json{{"context", a->name}, {"layers", layers}}.dump(2).c_str());
      } else {
        std::printf("calibrated %s: %d layers x %zu sparsity levels (use query --sparsity S)\n",
                    a->name.c_str(), info.layers, levels.size());
      }
      return kExitOk;
    };
  }
  // verify
  {
    auto* cmd = app.add_subcommand(
        "verify", "Check every page checksum and index invariant; non-zero exit on damage");
    auto name = std::make_shared<std::string>();
    cmd->add_option("name", *name, "Context name (default: all)");
    cmd->add_flag("--json", g.json, "Print JSON");
    (*runners)["verify"] = [name, &g]() {
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      ProgressBar bar("verify");
      VerifyReport report;
      Status s = store->Verify(
          *name, [&bar](int d, int t) { bar.Update(d, t); }, &report);
      bar.Finish();
      if (!s.ok()) return Fail(s);
      if (g.json) {
        std::printf("%s\n", nlohmann::json{{"ok", report.problems.empty()},
                                           {"contexts", report.contexts_checked},
                                           {"pages", report.pages_checked},
                                           {"bytes", report.bytes_checked},
                                           {"problems", report.problems}}
                                .dump(2)
                                .c_str());
      } else {
        for (const auto& p : report.problems) std::fprintf(stderr, "damaged: %s\n", p.c_str());
        std::printf("verified %d context(s), %lld pages (%.1f MiB): %s\n", report.contexts_checked,
                    static_cast<long long>(report.pages_checked), report.bytes_checked / 1048576.0,
                    report.problems.empty() ? "ok" : "DAMAGED");
      }
      return report.problems.empty() ? kExitOk : kExitCorruption;
    };
  }
  // compact
  {
    auto* cmd = app.add_subcommand(
        "compact", "Reclaim removed and superseded versions, crash leftovers; compact the catalog");
    cmd->add_flag("--json", g.json, "Print JSON");
    (*runners)["compact"] = [&g]() {
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      CompactReport r;
      if (Status s = store->Compact(&r); !s.ok()) return Fail(s);
      const int64_t catalog_saved = static_cast<int64_t>(r.catalog_bytes_before) -
                                    static_cast<int64_t>(r.catalog_bytes_after);
      if (g.json) {
        std::printf("%s\n", nlohmann::json{{"versions_reclaimed", r.versions_reclaimed},
                                           {"versions_in_use", r.versions_in_use},
                                           {"orphan_files_removed", r.orphan_files_removed},
                                           {"segment_bytes_reclaimed", r.segment_bytes_reclaimed},
                                           {"catalog_bytes_before", r.catalog_bytes_before},
                                           {"catalog_bytes_after", r.catalog_bytes_after}}
                                .dump(2)
                                .c_str());
      } else {
        std::printf(
            "compacted: %d version(s) reclaimed, %d orphan file(s), %.1f MiB of segments; "
            "catalog %.1f -> %.1f MiB (%+.1f MiB)\n",
            r.versions_reclaimed, r.orphan_files_removed, r.segment_bytes_reclaimed / 1048576.0,
            r.catalog_bytes_before / 1048576.0, r.catalog_bytes_after / 1048576.0,
            -catalog_saved / 1048576.0);
      }
      return kExitOk;
    };
  }
  // pin, unpin, preload
  for (const char* verb : {"pin", "preload"}) {
    const bool pin = std::string(verb) == "pin";
    auto* cmd = app.add_subcommand(
        verb, pin ? "Keep a context resident in a tier (persisted; pages never evicted)"
                  : "Warm a context into a tier (it may be evicted later)");
    struct Args {
      std::string name, tier = "host";
    };
    auto a = std::make_shared<Args>();
    cmd->add_option("name", a->name, "Context name")->required();
    cmd->add_option("--tier", a->tier, "host or device")->capture_default_str();
    cmd->add_flag(
        "--json", g.json,
        std::string("Print {\"") + (pin ? "pinned" : "preloaded") + "\": name, \"tier\": tier}");
    (*runners)[verb] = [a, &g, pin]() {
      Tier tier;
      if (!ParseTier(a->tier, &tier))
        return Fail(Status::InvalidArgument("--tier must be host or device"));
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      Status s = pin ? store->Pin(a->name, tier) : store->Preload(a->name, tier);
      if (!s.ok()) return Fail(s);
      if (g.json) {
        std::printf("%s\n", nlohmann::json{{pin ? "pinned" : "preloaded", a->name},
                                           {"tier", TierName(tier)}}
                                .dump()
                                .c_str());
      } else {
        std::printf("%s %s in the %s tier\n", pin ? "pinned" : "preloaded", a->name.c_str(),
                    TierName(tier));
      }
      return kExitOk;
    };
  }
  {
    auto* cmd = app.add_subcommand("unpin", "Let a pinned context be evicted again");
    auto name = std::make_shared<std::string>();
    cmd->add_option("name", *name, "Context name")->required();
    cmd->add_flag("--json", g.json, "Print {\"unpinned\": name}");
    (*runners)["unpin"] = [name, &g]() {
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      if (Status s = store->Unpin(*name); !s.ok()) return Fail(s);
      if (g.json) {
        std::printf("%s\n", nlohmann::json{{"unpinned", *name}}.dump().c_str());
      } else {
        std::printf("unpinned %s\n", name->c_str());
      }
      return kExitOk;
    };
  }
  // stats
  {
    auto* cmd = app.add_subcommand(
        "stats",
        "Contexts, keys, bytes on disk by kind, versions; the tiers' caches and counters (those "
        "of the server with --server)");
    cmd->add_flag("--json", g.json, "Print JSON");
    (*runners)["stats"] = [&g]() {
      std::unique_ptr<Store> store;
      if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
      StoreStats st;
      if (Status s = store->Stats(&st); !s.ok()) return Fail(s);
      TierStats ts;
      if (Status s = store->GetTierStats(&ts); !s.ok()) return Fail(s);
      if (g.json) {
        nlohmann::json j = StatsJson(st);
        j["tiers"] = TiersJson(ts);
        std::printf("%s\n", j.dump(2).c_str());
      } else {
        std::printf(
            "contexts           %d (%d calibrated)\nkeys               %lld\n"
            "segments           %.1f MiB\nindexes            %.1f MiB\n"
            "garbage segments   %.1f MiB (%d version(s), reclaimed by compact)\n"
            "catalog            %.1f MiB\n",
            st.contexts, st.calibrated_contexts, static_cast<long long>(st.keys),
            st.segment_bytes / 1048576.0, st.index_bytes / 1048576.0,
            st.garbage_segment_bytes / 1048576.0, st.garbage_versions,
            st.catalog_bytes / 1048576.0);
        std::printf(
            "host cache         %.1f of %.1f MiB, %llu hits, %llu misses\n"
            "index cache        %llu layers, %.1f of %.1f MiB\n"
            "device pool        %llu layers, %.1f of %.1f MiB\n",
            ts.host_bytes_in_use / 1048576.0, ts.host_capacity_bytes / 1048576.0,
            static_cast<unsigned long long>(ts.host_hits),
            static_cast<unsigned long long>(ts.host_misses),
            static_cast<unsigned long long>(ts.index_layers_cached),
            ts.index_bytes_cached / 1048576.0, ts.index_capacity_bytes / 1048576.0,
            static_cast<unsigned long long>(ts.device_layers_resident),
            ts.device_pool_bytes_used / 1048576.0, ts.device_pool_bytes / 1048576.0);
      }
      return kExitOk;
    };
  }
}

}  // namespace sqkv::cli
