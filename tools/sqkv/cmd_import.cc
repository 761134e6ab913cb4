#include <cstdio>

#include "tools/sqkv/cli.h"

namespace sqkv::cli {

void AddImport(CLI::App& app, GlobalOptions& g, Runner* run) {
  auto* cmd = app.add_subcommand(
      "import", "Import a context from a safetensors file (k.<l>, v.<l>, optional q.<l>)");
  struct Args {
    std::string name, file;
    ImportOptions options;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("name", args->name, "Context name ([A-Za-z0-9._-], 1-128 chars)")->required();
  cmd->add_option("file", args->file, "safetensors file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--centroids", args->options.centroid_fraction,
                  "Centroids per kv head as a fraction of the tokens")
      ->capture_default_str();
  cmd->add_option("--page-tokens", args->options.page_tokens, "Token slots per page")
      ->capture_default_str();
  cmd->add_option("--levels", args->options.levels, "Index levels (1, or 2 for hierarchical)")
      ->capture_default_str();
  cmd->add_option("--l1", args->options.l1_fraction,
                  "Level-1 centroids as a fraction of the tokens (with --levels 2)")
      ->capture_default_str();
  cmd->add_option("--iterations", args->options.kmeans_iterations, "K-means iterations")
      ->capture_default_str();
  auto kmeans_device = std::make_shared<std::string>("auto");
  cmd->add_option("--kmeans-device", *kmeans_device, "Where K-means runs: auto, gpu or cpu")
      ->capture_default_str();
  cmd->add_flag("--json", g.json, "Print the imported context as JSON");
  *run = [args, &g, kmeans_device]() {
    std::unique_ptr<Store> store;
    if (Status s = OpenStore(g, &store, /*create=*/true); !s.ok()) return Fail(s);
    ProgressBar bar("import " + args->name);
    ImportOptions options = args->options;
    if (!ParseDevice(*kmeans_device, &options.kmeans_device)) {
      return Fail(Status::InvalidArgument("--kmeans-device must be auto, gpu or cpu"));
    }
    options.progress = [&bar](int done, int total) { bar.Update(done, total); };
    const CancelOnInterrupt interrupt;
    options.cancelled = interrupt.Asked();
    SetTestHooks(&options);
    ContextInfo info;
    Status s = store->Import(args->name, args->file, options, &info);
    bar.Finish();
    if (!s.ok()) return Fail(s);
    if (g.json) {
      std::printf("%s\n", ContextJson(info).dump(2).c_str());
    } else {
      std::printf(
          "imported %s: %d layers x %d kv heads x %d tokens x %d dims (%s), %llu pages, "
          "%.1f MiB segment, built in %.2f s\n",
          info.name.c_str(), info.layers, info.kv_heads, info.tokens, info.head_dim,
          DTypeName(info.dtype), static_cast<unsigned long long>(info.layer_first_page.back()),
          info.segment_bytes / 1048576.0, info.build_seconds);
    }
    return kExitOk;
  };
}

}  // namespace sqkv::cli
