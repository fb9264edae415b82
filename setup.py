"""Builds the C++ CPU kernels into ``fastformers._C``.

``FASTFORMERS_BUILD_EXT=0`` skips the build; the package then runs every op
through its pure-PyTorch reference and warns once.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("FASTFORMERS_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            name="fastformers._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-std=c++20"],
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
