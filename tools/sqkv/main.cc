// sqkv: the admin and query command line of SqueezeKV. Every command calls the C++ API in api/.
#include <cstdio>

#include "tools/sqkv/cli.h"

int main(int argc, char** argv) {
  using namespace sqkv::cli;
  CLI::App app{
      "sqkv: serve attention over precompiled LLM contexts (Squeezed Attention).\n"
      "Data directory: --data DIR, else $SQKV_DATA, else ./sqkv-data."};
  app.set_version_flag("--version", "sqkv 0.1.0");
  app.require_subcommand(1);
  app.fallthrough();  // global options may follow the subcommand
  GlobalOptions g;
  app.add_option("--data", g.data_dir, "Store directory (default: $SQKV_DATA or ./sqkv-data)");
  app.add_option("--server", g.server,
                 "Talk to a `sqkv serve` at HOST:PORT instead of opening the store directory");
  app.add_option("--token-file", g.token_file, "File holding the server's token (with --server)");

  Runner import_run, query_run, ls_run, info_run, rm_run, synth_run, serve_run;
  AddImport(app, g, &import_run);
  AddQuery(app, g, &query_run);
  AddCatalogCommands(app, g, &ls_run, &info_run, &rm_run);
  AddSynth(app, g, &synth_run);
  AddServe(app, g, &serve_run);
  std::map<std::string, Runner> admin;
  AddAdminCommands(app, g, &admin);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // A word where the command should be: name it rather than say that one is missing.
    const std::vector<std::string> rest = app.remaining();
    if (app.get_subcommands().empty() && !rest.empty() && !rest[0].starts_with("-")) {
      std::fprintf(stderr, "sqkv: unknown command '%s' (sqkv --help lists them)\n",
                   rest[0].c_str());
      return kExitUsage;
    }
    const int code = app.exit(e);
    return code == 0 ? kExitOk : kExitUsage;
  }
  for (const auto& [name, run] :
       std::initializer_list<std::pair<const char*, Runner*>>{{"import", &import_run},
                                                              {"query", &query_run},
                                                              {"ls", &ls_run},
                                                              {"info", &info_run},
                                                              {"rm", &rm_run},
                                                              {"synth", &synth_run},
                                                              {"serve", &serve_run}}) {
    if (app.got_subcommand(name)) return (*run)();
  }
  for (auto& [name, run] : admin) {
    if (app.got_subcommand(name)) return run();
  }
  std::fprintf(stderr, "sqkv: no command (see sqkv --help)\n");
  return kExitUsage;
}
