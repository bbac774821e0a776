"""Parsing of config argument strings: `configs/base.py:paper,batch_size=512`."""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the fix."""


def _convert(text: str, default):
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", ""):
      return True
    if lowered in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'name' (boolean switch) and 'key=value' items, typed by their defaults.

  Unknown names are an error, so a typo never silently falls back to a default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    if not has_value and not isinstance(defaults[key], bool):
      raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
    try:
      parsed[key] = _convert(value.strip(), defaults[key]) if has_value else True
    except ValueError as error:
      raise ValueError(f"config argument {key!r}: {error}") from None
  return parsed
