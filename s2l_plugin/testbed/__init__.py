"""The embedded testbed: a tiny Stable Diffusion pretrained on a known corpus (scikit-learn digits).

Public API (no torch imported until a model is built or loaded):

- :func:`build_tiny_pipeline` -- random-init pipeline with the testbed architecture, in memory;
- :func:`build_testbed` -- run the seeded recipe (preset ``"test"`` or ``"demo"``) into a folder;
- :class:`Testbed` -- a built testbed on disk (``Testbed.load()`` = the shipped demo testbed),
  with :class:`Domain` and :class:`Sample` ground truth.
"""

from __future__ import annotations

from s2l_plugin.testbed.components import build_tiny_pipeline
from s2l_plugin.testbed.corpus import PRESETS, Domain, RecipeConfig, make_manifest, preset_config
from s2l_plugin.testbed.layout import SHIPPED_DEMO, Sample, Testbed
from s2l_plugin.testbed.recipe import build_testbed


def sources_hash() -> str:
    """A hash of the recipe's source files: the key under which a built testbed may be cached and reused.

    Any change to the recipe's code changes it, so a cache never serves weights an older recipe built.
    """
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]

__all__ = [
    "PRESETS",
    "SHIPPED_DEMO",
    "Domain",
    "RecipeConfig",
    "Sample",
    "Testbed",
    "build_testbed",
    "build_tiny_pipeline",
    "make_manifest",
    "preset_config",
    "sources_hash",
]
