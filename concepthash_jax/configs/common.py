"""Parses the `get_config(arg)` string of the config files (`configs/cub.py:nbit=32`).

Configs are data: this file only turns "key=value,key2=value2" into a ConfigDict
typed like the defaults; it imports nothing from the package and does no I/O.
"""
import ml_collections


def parse_arg(arg, **defaults):
  """Parses "a=1,b=x" (or bare positional values) against typed defaults.

  Tokens without '=' fill the keys in the order the defaults are given, so
  `configs/paper.py:cub,nbit=32` and `configs/paper.py:cub,32` are the same.

  Args:
    arg: the string after ':' in `--config=file.py:arg`, or None / ''.
    **defaults: key -> default value; the default's type (int, float, bool,
      str) converts the string.

  Returns:
    A ConfigDict with every key of `defaults`.

  Raises:
    ValueError: unknown key, too many positional values, or a value that does
      not convert to the default's type.
  """
  result = dict(defaults)
  keys = list(defaults)
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  for position, token in enumerate(tokens):
    if '=' in token:
      key, value = (s.strip() for s in token.split('=', 1))
    elif position < len(keys):
      key, value = keys[position], token
    else:
      raise ValueError(f'Too many positional values in config arg {arg!r}; '
                       f'keys: {keys}')
    if key not in defaults:
      raise ValueError(f'Unknown config arg {key!r} in {arg!r}; valid: {keys}')
    result[key] = _convert(key, value, defaults[key])
  return ml_collections.ConfigDict(result)


def _convert(key, value, default):
  """Converts `value` (a string) to the type of `default`."""
  if isinstance(default, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(f'Config arg {key}={value!r} is not a bool')
    return value.lower() in ('true', '1')
  try:
    return type(default)(value)
  except ValueError as e:
    raise ValueError(f'Config arg {key}={value!r} is not a '
                     f'{type(default).__name__}') from e
