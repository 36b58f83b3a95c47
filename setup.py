"""Build of the native kernel; all other metadata is in setup.cfg.

The kernel is optional: where it cannot be compiled, the install still
succeeds and `evaluation` and `knn` use their XLA paths.
"""
from setuptools import Extension
from setuptools import setup

_SOURCES = 'concepthash_jax/_hamming_src/'  # its units: common.h

setup(ext_modules=[Extension(
    'concepthash_jax._hamming',
    [_SOURCES + name for name in ('module.c', 'stats.c', 'knn.c', 'mih.c')],
    # A header change rebuilds (MANIFEST.in puts them in the sdist).
    depends=[_SOURCES + name for name in ('common.h', 'knn.h')],
    # No -march flags: the kernel picks its instruction set at run time, so
    # a wheel built here runs on any CPU of the same architecture (each
    # variant's functions carry their own target attribute, common.h).
    extra_compile_args=['-O3', '-std=c11', '-pthread'],
    extra_link_args=['-pthread'], optional=True)])
