"""A minimal safetensors reader for the tests: every tensor of a file as float32 numpy arrays
(F32, F16 and BF16), independent of sqkv's own reader."""
import json
import struct

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = data[b:e]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, {"F16": "<f2", "F32": "<f4"}[t["dtype"]]).astype(np.float32)
        out[name] = a.reshape(t["shape"])
    return out
