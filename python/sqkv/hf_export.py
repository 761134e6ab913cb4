"""Export a Hugging Face transformers KV cache to SqueezeKV's import format.

The import format is one safetensors file with, for every layer l from 0, `k.<l>` and `v.<l>` of
shape (kv_heads, tokens, head_dim) in F32, F16 or BF16, keys post-RoPE, and optionally `q.<l>`
(q_heads, window, head_dim), the queries of the context's last tokens (for calibration).

transformers' decoder models (Llama, Mistral, Qwen2, Gemma, ...) apply the rotary embedding to
the keys before they enter the cache, so `past_key_values` already holds post-RoPE keys:

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sqkv.hf_export import export_past_key_values

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16)
    ids = tok(document, return_tensors="pt").input_ids
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    export_past_key_values(cache, "doc.safetensors")

Then `sqkv import doc doc.safetensors` (or Client.import_file). At inference, the query vectors
sent to `query` must be post-RoPE as well, at the positions the new tokens have after the
document.

Needs numpy; torch only to convert torch tensors (which it is given). No safetensors package.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["export_past_key_values", "cache_layers", "write_safetensors"]

_ALIGN = 8


def cache_layers(past_key_values: Any) -> List[Tuple[Any, Any]]:
    """The (keys, values) pairs of every layer of a transformers cache, each of shape
    (batch, kv_heads, tokens, head_dim). Accepts a Cache object of recent transformers versions
    (`.layers[i].keys/.values`), older ones (`.key_cache` / `.value_cache`), and the legacy tuple
    of (key, value) per layer."""
    layers = getattr(past_key_values, "layers", None)
    if layers is not None and len(layers) > 0 and hasattr(layers[0], "keys"):
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(past_key_values, "key_cache") and hasattr(past_key_values, "value_cache"):
        return list(zip(past_key_values.key_cache, past_key_values.value_cache))
    if hasattr(past_key_values, "to_legacy_cache"):
        past_key_values = past_key_values.to_legacy_cache()
    pairs = []
    for i, layer in enumerate(past_key_values):
        if not isinstance(layer, (tuple, list)) or len(layer) < 2:
            raise TypeError(f"layer {i} of the cache is not a (key, value) pair")
        pairs.append((layer[0], layer[1]))
    return pairs


def _tensor_bytes(t: Any) -> Tuple[str, List[int], bytes]:
    """(safetensors dtype, shape, little-endian C-order bytes) of a torch tensor or array."""
    if hasattr(t, "detach"):  # torch
        import torch  # only when given torch tensors

        t = t.detach().to("cpu").contiguous()
        shape = list(t.shape)
        if t.dtype == torch.bfloat16:
            return "BF16", shape, t.view(torch.int16).numpy().astype("<i2").tobytes()
        if t.dtype == torch.float16:
            return "F16", shape, t.numpy().astype("<f2").tobytes()
        return "F32", shape, t.to(torch.float32).numpy().astype("<f4").tobytes()
    a = np.ascontiguousarray(t)
    if a.dtype == np.float16:
        return "F16", list(a.shape), a.astype("<f2").tobytes()
    return "F32", list(a.shape), a.astype("<f4").tobytes()


def write_safetensors(path: str, tensors: Sequence[Tuple[str, str, List[int], bytes]],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes (name, dtype, shape, bytes) tensors back to back in a safetensors file."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, _, data in tensors:
            f.write(data)


# Cache classes whose tensors are not simply the sequence's tokens: preallocated to a maximum length
# (zero-filled past the tokens seen) or keeping only a sliding window of the latest ones.
_PADDED_CACHES = ("StaticCache", "OffloadedStaticCache", "HybridCache", "HybridChunkedCache")
_WINDOWED_CACHES = ("SlidingWindowCache", "HybridCache", "HybridChunkedCache")


def _check_cache_kind(past_key_values: Any, token_range: Optional[Tuple[int, int]]) -> None:
    names = {cls.__name__ for cls in type(past_key_values).__mro__}
    layers = getattr(past_key_values, "layers", None) or []
    if names & set(_WINDOWED_CACHES) or any(getattr(l, "is_sliding", False) for l in layers):
        raise ValueError("sliding-window cache layers hold only the latest tokens; export a "
                         "cache of full attention (e.g. DynamicCache) instead")
    if names & set(_PADDED_CACHES) and token_range is None:
        raise ValueError(f"{type(past_key_values).__name__} is allocated past the tokens seen: "
                         "give attention_mask (or tokens=) so only real tokens are exported")


def _token_range(attention_mask: Any, tokens: Optional[int], batch: int) -> Optional[Tuple[int, int]]:
    """(first, end) of the real tokens along the cache's token axis, or None for all of them."""
    if attention_mask is not None and tokens is not None:
        raise ValueError("give attention_mask or tokens, not both")
    if tokens is not None:
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        return (0, tokens)
    if attention_mask is None:
        return None
    mask = attention_mask.detach().to("cpu").numpy() if hasattr(attention_mask, "detach") \
        else np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.ndim != 2 or not 0 <= batch < mask.shape[0]:
        raise ValueError(f"attention_mask must be (batch, tokens) covering batch {batch}")
    real = np.flatnonzero(mask[batch] != 0)
    if real.size == 0:
        raise ValueError(f"attention_mask has no real token for batch {batch}")
    first, end = int(real[0]), int(real[-1]) + 1
    if end - first != real.size:
        raise ValueError("attention_mask's real tokens are not one contiguous run")
    return (first, end)


def export_past_key_values(past_key_values: Any, path: str, batch: int = 0,
                           queries: Optional[Mapping[int, Any]] = None,
                           dtype: Optional[str] = None, attention_mask: Any = None,
                           tokens: Optional[int] = None) -> Dict[str, int]:
    """Writes one sequence of a transformers KV cache as a SqueezeKV context file.

    past_key_values: the model's cache (any form `cache_layers` accepts); keys post-RoPE. Sliding-
      window caches are refused (they no longer hold the whole context).
    batch: which sequence of the batch to export.
    queries: optional {layer: (q_heads, window, head_dim)} post-RoPE queries of the context's
      last tokens, for every layer or none; written as q.<layer> (used by `sqkv calibrate`).
    dtype: "bf16", "f16" or "f32" to convert to; default: keep the cache's dtype (which must be
      the same for every tensor).
    attention_mask: optional (batch, tokens) mask of the forward pass; only the batch's real
      tokens (one contiguous run, e.g. after left padding) are exported. Required, or `tokens`,
      for caches allocated past the tokens seen (StaticCache).
    tokens: optional count of real tokens from the start (the rest is padding).
    Returns {"layers", "kv_heads", "tokens", "head_dim"}.
    """
    pairs = cache_layers(past_key_values)
    if not pairs:
        raise ValueError("the cache has no layers")
    token_range = _token_range(attention_mask, tokens, batch)
    _check_cache_kind(past_key_values, token_range)
    if queries is not None and set(queries) != set(range(len(pairs))):
        raise ValueError("queries must be given for every layer or none")
    tensors = []
    shape = None
    first_dtype = None
    for layer, (k, v) in enumerate(pairs):
        for kind, t in (("k", k), ("v", v)):
            name = f"{kind}.{layer}"
            if t is None:
                raise ValueError(f"{name} is empty (a layer the forward pass did not fill)")
            t = _select_batch(t, batch, name)
            if token_range is not None:
                if token_range[1] > t.shape[1]:
                    raise ValueError(f"{name} holds {t.shape[1]} tokens, the real ones end at "
                                     f"{token_range[1]}")
                t = t[:, token_range[0]:token_range[1]]
            t = _convert(t, dtype)
            tdtype, tshape, data = _tensor_bytes(t)
            if shape is None:
                shape, first_dtype = tshape, tdtype
            elif tshape != shape:
                raise ValueError(f"{name} has shape {tshape}, layer 0 has {shape} "
                                 "(sliding-window or mixed caches are not supported)")
            elif tdtype != first_dtype:
                raise ValueError(f"{name} is {tdtype}, k.0 is {first_dtype}: give dtype= to "
                                 "export them all in one")
            tensors.append((name, tdtype, tshape, data))
    if queries is not None:
        for layer in range(len(pairs)):
            q = _convert(queries[layer], dtype)
            qdtype, qshape, data = _tensor_bytes(q)
            if len(qshape) != 3 or qshape[2] != shape[2]:
                raise ValueError(f"q.{layer} must be (q_heads, window, {shape[2]}), got {qshape}")
            tensors.append((f"q.{layer}", qdtype, qshape, data))
    write_safetensors(path, tensors, {"producer": "sqkv.hf_export"})
    return {"layers": len(pairs), "kv_heads": shape[0], "tokens": shape[1], "head_dim": shape[2]}


def _select_batch(t: Any, batch: int, name: str) -> Any:
    if len(t.shape) != 4:
        raise ValueError(f"{name}: expected (batch, kv_heads, tokens, head_dim), got {tuple(t.shape)}")
    if not 0 <= batch < t.shape[0]:
        raise ValueError(f"{name}: batch {batch} out of range (batch size {t.shape[0]})")
    return t[batch]


def _convert(t: Any, dtype: Optional[str]) -> Any:
    if dtype is None:
        return t
    if dtype not in ("bf16", "f16", "f32"):
        raise ValueError(f"dtype must be bf16, f16 or f32, not {dtype!r}")
    if hasattr(t, "detach"):
        import torch

        return t.to({"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype])
    if dtype == "bf16":
        raise ValueError("numpy arrays cannot be converted to bf16; pass torch tensors")
    return np.asarray(t, dtype={"f16": np.float16, "f32": np.float32}[dtype])
