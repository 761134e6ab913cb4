"""Python client of the SqueezeKV server (`sqkv serve`), and the Hugging Face cache exporter.

`Client`, `Error` and `load_schema` need pycapnp and are loaded on first use, so that
`sqkv.hf_export` (numpy only) works where pycapnp is not installed.
"""
__all__ = ["Client", "Error", "load_schema"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from sqkv import client

        return getattr(client, name)
    raise AttributeError(f"module 'sqkv' has no attribute {name!r}")
