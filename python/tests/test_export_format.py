"""sqkv.hf_export without torch: caches in the forms transformers uses (Cache objects with
.layers[i].keys/.values, older .key_cache/.value_cache, legacy tuples) built from numpy arrays are
written in the import format, read back unchanged, and (when the sqkv binary is built) served:
dense attention over them matches a float64 reference."""
from types import SimpleNamespace

import pytest

np = pytest.importorskip("numpy")

from sqkv.hf_export import cache_layers, export_past_key_values  # noqa: E402
from safetensors_reader import read_safetensors  # noqa: E402

LAYERS, KV_HEADS, TOKENS, HEAD_DIM, Q_HEADS = 2, 2, 40, 16, 4


def fake_pairs(rng):
    return [(rng.standard_normal((1, KV_HEADS, TOKENS, HEAD_DIM)).astype(np.float32),
             rng.standard_normal((1, KV_HEADS, TOKENS, HEAD_DIM)).astype(np.float32))
            for _ in range(LAYERS)]


def forms(pairs):
    yield "layers", SimpleNamespace(
        layers=[SimpleNamespace(keys=k, values=v) for k, v in pairs])
    yield "key_cache", SimpleNamespace(key_cache=[k for k, _ in pairs],
                                       value_cache=[v for _, v in pairs])
    yield "legacy", tuple(pairs)


def test_every_cache_form_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    pairs = fake_pairs(rng)
    for form, cache in forms(pairs):
        assert len(cache_layers(cache)) == LAYERS, form
        path = str(tmp_path / f"{form}.safetensors")
        shape = export_past_key_values(cache, path)
        assert shape == {"layers": LAYERS, "kv_heads": KV_HEADS, "tokens": TOKENS,
                         "head_dim": HEAD_DIM}
        got = read_safetensors(path)
        for layer, (k, v) in enumerate(pairs):
            assert np.array_equal(got[f"k.{layer}"], k[0]), form
            assert np.array_equal(got[f"v.{layer}"], v[0]), form


def test_queries_dtype_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    pairs = fake_pairs(rng)
    qs = {l: rng.standard_normal((Q_HEADS, 3, HEAD_DIM)).astype(np.float32) for l in range(LAYERS)}
    path = str(tmp_path / "q.safetensors")
    export_past_key_values(tuple(pairs), path, queries=qs, dtype="f16")
    got = read_safetensors(path)
    assert got["q.1"].shape == (Q_HEADS, 3, HEAD_DIM)
    assert np.allclose(got["k.0"], pairs[0][0][0], atol=1e-2)
    with pytest.raises(ValueError):
        export_past_key_values(tuple(pairs), path, queries={0: qs[0]})  # not every layer
    with pytest.raises(ValueError):
        export_past_key_values(tuple(pairs), path, batch=1)
    with pytest.raises(ValueError):
        export_past_key_values(tuple(pairs), path, dtype="bf16")  # numpy has no bf16


def test_exported_file_serves_exact_dense_attention(sqkv_bin, server, tmp_path):
    pytest.importorskip("capnp")
    from sqkv import Client

    rng = np.random.default_rng(2)
    pairs = fake_pairs(rng)
    path = str(tmp_path / "ctx.safetensors")
    export_past_key_values(tuple(pairs), path)
    q = rng.standard_normal((Q_HEADS, 2, HEAD_DIM)).astype(np.float32)
    with Client(server.address) as c:
        c.import_file("exported", path, centroid_fraction=0.25)
        for layer, (k, v) in enumerate(pairs):
            out, lse = c.query("exported", layer=layer, q=q, dense=True)
            group = Q_HEADS // KV_HEADS
            for h in range(Q_HEADS):
                kk, vv = k[0, h // group].astype(np.float64), v[0, h // group].astype(np.float64)
                s = q[h].astype(np.float64) @ kk.T / np.sqrt(HEAD_DIM)
                m = s.max(axis=1, keepdims=True)
                p = np.exp(s - m)
                ref = (p @ vv) / p.sum(axis=1, keepdims=True)
                assert np.allclose(out[h], ref, rtol=1e-4, atol=1e-5)
                assert np.allclose(lse[h], m[:, 0] + np.log(p.sum(axis=1)), atol=1e-4)


def test_padding_windows_dtypes_and_empty_layers(tmp_path):
    """Only real tokens are exported: a mask (left padding) or a count (a cache allocated past
    them) selects them; a padded cache class without either, a sliding-window cache, mixed dtypes
    and an unfilled layer are refused with a named error."""
    rng = np.random.default_rng(2)
    pairs = fake_pairs(rng)
    path = str(tmp_path / "p.safetensors")
    mask = np.zeros((1, TOKENS), dtype=np.int64)
    mask[0, 7:] = 1  # 7 pad tokens on the left
    shape = export_past_key_values(tuple(pairs), path, attention_mask=mask)
    assert shape["tokens"] == TOKENS - 7
    got = read_safetensors(path)
    assert np.array_equal(got["k.1"], pairs[1][0][0][:, 7:])
    assert np.array_equal(got["v.0"], pairs[0][1][0][:, 7:])
    shape = export_past_key_values(tuple(pairs), path, tokens=25)
    assert shape["tokens"] == 25
    assert np.array_equal(read_safetensors(path)["k.0"], pairs[0][0][0][:, :25])

    class StaticCache(SimpleNamespace):
        pass

    static = StaticCache(layers=[SimpleNamespace(keys=k, values=v) for k, v in pairs])
    with pytest.raises(ValueError, match="attention_mask"):
        export_past_key_values(static, path)
    assert export_past_key_values(static, path, tokens=30)["tokens"] == 30

    windowed = SimpleNamespace(
        layers=[SimpleNamespace(keys=k, values=v, is_sliding=True) for k, v in pairs])
    with pytest.raises(ValueError, match="sliding-window"):
        export_past_key_values(windowed, path)
    mixed = [(pairs[0][0].astype(np.float16), pairs[0][1])] + pairs[1:]
    with pytest.raises(ValueError, match="dtype"):
        export_past_key_values(tuple(mixed), path)
    with pytest.raises(ValueError, match="empty"):
        export_past_key_values(SimpleNamespace(layers=[SimpleNamespace(keys=None, values=None)]),
                               path)
    gap = mask.copy()
    gap[0, 20] = 0
    with pytest.raises(ValueError, match="contiguous"):
        export_past_key_values(tuple(pairs), path, attention_mask=gap)
