// ls, info, rm.
#include <cstdio>

#include "tools/sqkv/cli.h"

namespace sqkv::cli {

void AddCatalogCommands(CLI::App& app, GlobalOptions& g, Runner* ls, Runner* info, Runner* rm) {
  auto* ls_cmd = app.add_subcommand("ls", "List the contexts of the store");
  ls_cmd->add_flag("--json", g.json, "Print JSON");
  *ls = [&g]() {
    std::unique_ptr<Store> store;
    if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
    std::vector<ContextInfo> all;
    if (Status s = store->List(&all); !s.ok()) return Fail(s);
    if (g.json) {
      nlohmann::json arr = nlohmann::json::array();
      for (const auto& c : all) arr.push_back(ContextJson(c));
      std::printf("%s\n", arr.dump(2).c_str());
      return kExitOk;
    }
    if (all.empty()) {
      std::printf("no contexts in %s\n", store->data_dir().c_str());
      return kExitOk;
    }
    std::printf("%-24s %7s %9s %7s %5s %5s %10s\n", "NAME", "LAYERS", "TOKENS", "KVHEADS", "DIM",
                "DTYPE", "SIZE(MiB)");
    for (const auto& c : all) {
      std::printf("%-24s %7d %9d %7d %5d %5s %10.1f\n", c.name.c_str(), c.layers, c.tokens,
                  c.kv_heads, c.head_dim, DTypeName(c.dtype), c.segment_bytes / 1048576.0);
    }
    return kExitOk;
  };

  auto* info_cmd = app.add_subcommand("info", "Show one context");
  auto info_name = std::make_shared<std::string>();
  info_cmd->add_option("name", *info_name, "Context name")->required();
  info_cmd->add_flag("--json", g.json, "Print JSON");
  *info = [&g, info_name]() {
    std::unique_ptr<Store> store;
    if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
    ContextInfo c;
    if (Status s = store->Info(*info_name, &c); !s.ok()) return Fail(s);
    nlohmann::json j = ContextJson(c);
    if (g.json) {
      std::printf("%s\n", j.dump(2).c_str());
      return kExitOk;
    }
    for (const auto& [key, value] : j.items()) {
      std::printf("%-18s %s\n", key.c_str(), value.dump().c_str());
    }
    return kExitOk;
  };

  auto* rm_cmd = app.add_subcommand("rm", "Remove a context (its catalog entries and segment)");
  auto rm_name = std::make_shared<std::string>();
  rm_cmd->add_option("name", *rm_name, "Context name")->required();
  rm_cmd->add_flag("--json", g.json, "Print {\"removed\": name}");
  *rm = [&g, rm_name]() {
    std::unique_ptr<Store> store;
    if (Status s = OpenStore(g, &store); !s.ok()) return Fail(s);
    if (Status s = store->Remove(*rm_name); !s.ok()) return Fail(s);
    if (g.json) {
      std::printf("%s\n", nlohmann::json{{"removed", *rm_name}}.dump().c_str());
    } else {
      std::printf("removed %s\n", rm_name->c_str());
    }
    return kExitOk;
  };
}

}  // namespace sqkv::cli
