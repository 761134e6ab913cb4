"""Python client of the SqueezeKV server (`sqkv serve`)."""
from sqkv.client import Client, Error, load_schema

__all__ = ["Client", "Error", "load_schema"]
__version__ = "0.1.0"
