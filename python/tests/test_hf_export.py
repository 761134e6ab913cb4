"""Exporting a Hugging Face transformers cache: a tiny randomly initialised Llama (built here,
never downloaded) runs a prompt; its past_key_values are exported, read back and (when the sqkv
binary is built) imported into a server and queried densely against a float64 reference.

Runs only where torch and transformers are installed; skipped otherwise."""

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sqkv.hf_export import cache_layers, export_past_key_values  # noqa: E402
from safetensors_reader import read_safetensors  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, TOKENS = 2, 4, 2, 16, 48


def header_dtypes(path):
    """{tensor name: dtype} from the file's header, read independently of the exporter."""
    import json
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {name: t["dtype"] for name, t in header.items() if name != "__metadata__"}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=128,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def cache():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, TOKENS))
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def test_export_matches_the_cache(cache, tmp_path):
    path = str(tmp_path / "ctx.safetensors")
    shape = export_past_key_values(cache, path)
    assert shape == {"layers": LAYERS, "kv_heads": KV_HEADS, "tokens": TOKENS,
                     "head_dim": HEAD_DIM}
    got = read_safetensors(path)
    for layer, (k, v) in enumerate(cache_layers(cache)):
        assert np.array_equal(got[f"k.{layer}"], k[0].float().numpy())
        assert np.array_equal(got[f"v.{layer}"], v[0].float().numpy())
    # The 16-bit exports hold exactly torch's rounding of every value, in the dtype they name.
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        p = str(tmp_path / f"{dtype}.safetensors")
        export_past_key_values(cache, p, dtype=dtype)
        assert set(header_dtypes(p).values()) == {dtype.upper()}
        half = read_safetensors(p)
        for layer, (k, v) in enumerate(cache_layers(cache)):
            assert np.array_equal(half[f"k.{layer}"], k[0].to(torch_dtype).float().numpy())
            assert np.array_equal(half[f"v.{layer}"], v[0].to(torch_dtype).float().numpy())
    # A model run in bf16: its cache is exported as it is, bit for bit.
    model = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        bf_cache = model(torch.randint(0, 128, (1, TOKENS)), use_cache=True).past_key_values
    p = str(tmp_path / "model_bf16.safetensors")
    export_past_key_values(bf_cache, p)
    assert set(header_dtypes(p).values()) == {"BF16"}
    got = read_safetensors(p)
    for layer, (k, v) in enumerate(cache_layers(bf_cache)):
        assert k.dtype == torch.bfloat16
        assert np.array_equal(got[f"k.{layer}"], k[0].float().numpy())
        assert np.array_equal(got[f"v.{layer}"], v[0].float().numpy())


def test_exported_cache_serves_dense_attention(cache, tmp_path, request):
    try:
        sqkv_bin = request.getfixturevalue("sqkv_bin")
    except pytest.skip.Exception:
        pytest.skip("sqkv binary not built: export checked, serving not")
    pytest.importorskip("capnp")
    from conftest import Server
    from sqkv import Client

    path = str(tmp_path / "ctx.safetensors")
    export_past_key_values(cache, path, dtype="f32")
    server = Server(sqkv_bin, str(tmp_path / "data"))
    try:
        with Client(server.address) as c:
            c.import_file("hf", path, centroid_fraction=0.25)
            rng = np.random.default_rng(1)
            q = rng.standard_normal((HEADS, 2, HEAD_DIM)).astype(np.float32)
            for layer, (k, v) in enumerate(cache_layers(cache)):
                out, lse = c.query("hf", layer=layer, q=q, dense=True)
                k64, v64 = k[0].double().numpy(), v[0].double().numpy()
                group = HEADS // KV_HEADS
                for h in range(HEADS):
                    s = q[h].astype(np.float64) @ k64[h // group].T / np.sqrt(HEAD_DIM)
                    m = s.max(axis=1, keepdims=True)
                    p = np.exp(s - m)
                    ref = (p @ v64[h // group]) / p.sum(axis=1, keepdims=True)
                    assert np.allclose(out[h], ref, rtol=1e-4, atol=1e-5)
                    assert np.allclose(lse[h], (m[:, 0] + np.log(p.sum(axis=1))), atol=1e-4)
    finally:
        assert server.stop() == 0
