"""Analysis of ConceptHash codes and concept attention: see `parts`.

Transitional: the module `interpret.py` moved to `interpret/parts.py` so that
its history follows; the next commit splits it into one module per concern.
"""
from concepthash_jax.interpret.parts import *  # pylint: disable=wildcard-import
