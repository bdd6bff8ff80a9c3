"""Build of threatgate's compiled parts: the matching engine and the balancer's reply scanner (everything else
is in pyproject.toml).

The engine (src/threatgate/node/_engine.c) is a plain C extension built by setuptools, as aiohttp's and
uvloop's are.  It links PCRE2 (Debian: libpcre2-dev; scripts/bootstrap installs it with gcc and the Python
headers when missing) and compiles the vendored single-header xxHash (BSD-2-Clause, _native/).  The pure-
Python matcher stays the reference (THREATGATE_ENGINE=reference selects it); docs/architecture.md says why.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "threatgate.node._engine",
            sources=["src/threatgate/node/_engine.c"],
            depends=["src/threatgate/node/_native/xxhash.h"],
            include_dirs=["src/threatgate/node/_native"],
            libraries=["pcre2-8"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
        # The balancer's reply scanner (lb/correlation.py keeps the Python reference of the same logic).
        Extension(
            "threatgate.lb._scan",
            sources=["src/threatgate/lb/_scan.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ]
)
