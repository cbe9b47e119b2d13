"""The one compiled piece of Bastion, optional: the byte-plane transform of `bastion ckpt pack`
(bastion/checkpoint/_planes.c). Where no C compiler is available the install still succeeds
and the pack uses the same transform written with numpy (bastion/checkpoint/planes.py),
slower but byte-identical. Everything else about the package is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("bastion.checkpoint._planes", ["bastion/checkpoint/_planes.c"],
                             extra_compile_args=["-O3"], optional=True)])
