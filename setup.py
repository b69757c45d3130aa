# Metadata lives in pyproject.toml. The native extension is built on first use by
# nla_fast.extension (torch.utils.cpp_extension + ninja), so this stays a shim.
from setuptools import setup

setup()
