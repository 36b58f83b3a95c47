"""ConceptHash in JAX/Flax: interpretable fine-grained hashing on a frozen CLIP.

The method, its recipe switches and the public contract: docs/method.md.
"""
import logging as _logging


def _drop_torch_notice(record: _logging.LogRecord) -> bool:
  # Importing transformers without PyTorch logs "PyTorch was not found. Models
  # won't be available...". We use only its config and tokenizer classes, which
  # need no PyTorch, so the notice reads like a broken install; any other
  # transformers message still shows.
  return not record.getMessage().startswith('PyTorch was not found.')


_logging.getLogger('transformers').addFilter(_drop_torch_notice)
