"""Build of the native evaluation kernel; all other metadata is in setup.cfg.

The kernel is optional: where it cannot be compiled, the install still
succeeds and `evaluation` uses its XLA path.
"""
from setuptools import Extension
from setuptools import setup

setup(ext_modules=[Extension(
    'concepthash_jax._hamming', ['concepthash_jax/_hamming.c'],
    # No -march flags: the kernel picks its instruction set at run time, so
    # a wheel built here runs on any CPU of the same architecture.
    extra_compile_args=['-O3', '-std=c11', '-pthread'],
    extra_link_args=['-pthread'], optional=True)])
