"""Builds the C++ grouping core (csrc/) as ``omnibal_pl.balance._core``; metadata lives in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

core = Pybind11Extension(
    "omnibal_pl.balance._core",
    sources=["csrc/bindings.cpp", "csrc/isf.cpp", "csrc/balanced.cpp", "csrc/knapsack.cpp", "csrc/exchange.cpp"],
    include_dirs=["csrc"],
    depends=["csrc/rng.h", "csrc/grouping.h"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(ext_modules=[core], cmdclass={"build_ext": build_ext})
