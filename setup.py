"""Builds the C++ CPU kernels into ``fastformers._C``.

``FASTFORMERS_BUILD_EXT=0`` skips the build; the package then runs every op
through its pure-PyTorch reference and warns once. ``FASTFORMERS_SANITIZE=1``
builds with AddressSanitizer and UndefinedBehaviorSanitizer (see the README's
"Sanitizer build" for how to run the tests under it).
"""
import glob
import os
import sys
import sysconfig

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("FASTFORMERS_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    compile_args, link_args = ["-O3", "-fopenmp", "-std=c++20"], ["-fopenmp"]
    if os.environ.get("FASTFORMERS_SANITIZE", "0") == "1":
        # -O1 and frame pointers: readable reports at a bearable speed; -fno-sanitize-recover makes
        # undefined behaviour abort (a failing test) instead of printing and going on
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        compile_args = ["-O1", "-g", "-fopenmp", "-std=c++20", *sanitize]
        link_args = ["-fopenmp", *sanitize]
    ext_modules.append(
        CppExtension(
            name="fastformers._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            py_limited_api=False,
        )
    )

    class BuildExtensionInBuildDir(BuildExtension.with_options(use_ninja=True)):
        """Compiles in build/temp.PLATFORM-PYTHON, setuptools' usual place, for every kind of build.
        pip's editable install would compile in a temporary directory it then deletes; a fixed one
        lets every later build (a non-editable install, a wheel, ``build_ext --inplace``) recompile
        only what changed, since ninja is incremental."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join("build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    cmdclass["build_ext"] = BuildExtensionInBuildDir

setup(ext_modules=ext_modules, cmdclass=cmdclass)
