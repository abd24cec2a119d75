"""Build the optional compiled core, shmq._core (see docs/core.md).

The project's metadata is in pyproject.toml; this file only adds the C
extension, marked optional: where no C compiler (or no Python headers) is
found, the build prints a warning and installs the pure-Python core.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmq._core",
            sources=["shmq/_core.c"],
            extra_compile_args=["-O2", "-std=gnu11"],
            optional=True,
        )
    ]
)
