// synth: writes a synthetic context and matching queries (see api/synthetic.h).
#include <cstdio>

#include "api/synthetic.h"
#include "storage/npy.h"
#include "tools/sqkv/cli.h"

namespace sqkv::cli {
namespace {

struct SynthArgs {
  std::string out, queries_out, dtype = "bf16";
  SyntheticOptions options;
};

int RunSynth(const SynthArgs& a, const GlobalOptions& g) {
  auto dtype = ParseDType(a.dtype);
  if (!dtype) return Fail(Status::InvalidArgument("--dtype must be f32, f16 or bf16"));
  SyntheticOptions o = a.options;
  o.dtype = *dtype;
  std::vector<float> queries;
  if (Status s = WriteSyntheticContext(o, a.out, &queries); !s.ok()) return Fail(s);
  if (!a.queries_out.empty()) {
    if (Status s = WriteNpy(a.queries_out, queries.data(), {o.q_heads, o.n, o.head_dim}); !s.ok()) {
      return Fail(s);
    }
  }
  if (g.json) {
    std::printf("%s\n", nlohmann::json{{"file", a.out}, {"queries", a.queries_out},
                                       {"layers", o.layers}, {"kv_heads", o.kv_heads},
                                       {"q_heads", o.q_heads}, {"tokens", o.tokens},
                                       {"head_dim", o.head_dim}, {"dtype", a.dtype}}
                            .dump(2)
                            .c_str());
  } else {
    std::printf("wrote %s: %d layers x %d kv heads x %d tokens x %d dims (%s)%s%s\n",
                a.out.c_str(), o.layers, o.kv_heads, o.tokens, o.head_dim, a.dtype.c_str(),
                a.queries_out.empty() ? "" : ", queries ", a.queries_out.c_str());
  }
  return kExitOk;
}

}  // namespace

void AddSynth(CLI::App& app, GlobalOptions& g, Runner* run) {
  auto* cmd = app.add_subcommand(
      "synth", "Write a synthetic context (safetensors) and matching queries (.npy)");
  auto a = std::make_shared<SynthArgs>();
  SyntheticOptions& o = a->options;
  cmd->add_option("out", a->out, "Output .safetensors")->required();
  cmd->add_option("--queries-out", a->queries_out,
                  "Also write layer-0 user queries (q_heads, n, head_dim) to this .npy");
  cmd->add_option("--layers", o.layers)->capture_default_str();
  cmd->add_option("--kv-heads", o.kv_heads)->capture_default_str();
  cmd->add_option("--q-heads", o.q_heads)->capture_default_str();
  cmd->add_option("--tokens", o.tokens)->capture_default_str();
  cmd->add_option("--head-dim", o.head_dim)->capture_default_str();
  cmd->add_option("--dtype", a->dtype, "f32, f16 or bf16")->capture_default_str();
  cmd->add_option("--window", o.window, "Window queries kept per layer (0: none)")
      ->capture_default_str();
  cmd->add_option("--topics", o.topics, "Key directions per head")->capture_default_str();
  cmd->add_option("-n,--n", o.n, "User query tokens in --queries-out")->capture_default_str();
  cmd->add_option("--seed", o.seed)->capture_default_str();
  cmd->add_flag("--json", g.json, "Print JSON");
  *run = [a, &g]() { return RunSynth(*a, g); };
}

}  // namespace sqkv::cli
