"""Checkpoint formats: detection by content, loaders for community formats, compatibility checks.

- :mod:`s2l_plugin.formats.detect` -- safe reading (validated safetensors headers, weights-only
  pickles behind an opt-in) and format detection from keys;
- :mod:`s2l_plugin.formats.loaders` -- the Loader objects registered through ``register_loaders``
  and :func:`~s2l_plugin.formats.loaders.load_target`;
- :mod:`s2l_plugin.formats.compat` -- target-vs-base width checks.

Nothing heavy is imported here.
"""
