"""Typed configuration shared by every layer (docs/architecture.md, layer 0).

- `flags`: `option` declares a dataclass field with its flag and help; `add_flags` generates
  the Megatron-style flags from the fields, `from_namespace` builds the dataclass back (its
  `__post_init__` checks the values); `load_yaml` reads a `--config` file of flag values;
  `ConfigError` names the file, key or flag.
"""
