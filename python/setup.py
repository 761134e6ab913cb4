"""Copies the wire schema (api/net/sqkv.capnp, the single source) into the package at build time,
so `pip install ./python` from a clone ships the schema the server speaks."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = os.path.join(HERE, "..", "api", "net", "sqkv.capnp")


class BuildPyWithSchema(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "sqkv", "sqkv.capnp")
        if os.path.exists(SCHEMA):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(SCHEMA, target)
        elif not os.path.exists(target):
            raise RuntimeError("api/net/sqkv.capnp not found: build from a SqueezeKV checkout")


setup(cmdclass={"build_py": BuildPyWithSchema})
