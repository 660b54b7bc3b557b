"""The testbed corpus: domains, caption templates, recipe presets and the seeded member / non-member split.

Everything here is cheap and needs no torch: the split and the manifest are a pure function of
(preset knobs, seed), so a test can recompute them and compare with a shipped testbed.
Images come from scikit-learn's bundled ``load_digits`` (8x8, 0..16 ink), upscaled to 16x16 RGB.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from s2l_plugin.config import check_choice, check_positive, check_range
from s2l_plugin.errors import ConfigError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Caption templates; the first is the domain's prompt (what S2L prompts the model with).
#: Each image gets one of them (seeded) as its fixed caption, as a web image has one alt text.
CAPTION_TEMPLATES = (
    "a photo of the digit {name}",
    "a handwritten digit {name}",
    "a scan of the number {name}",
    "the digit {name}, handwritten",
)

MANIFEST_FORMAT = "s2l-testbed/1"
ROLES = ("member", "nonmember", "duplicated")


@dataclass(frozen=True)
class Domain:
    """One digit class: ``name`` ("seven"), ``digit`` (7), ``prompt`` and the ``captions`` its images use."""

    name: str
    digit: int
    prompt: str
    captions: tuple[str, ...]


def make_domain(digit: int) -> Domain:
    name = DIGIT_NAMES[digit]
    captions = tuple(t.format(name=name) for t in CAPTION_TEMPLATES)
    return Domain(name=name, digit=digit, prompt=captions[0], captions=captions)


#: How a duplicated member is captioned: its seeded template (default) or the domain's prompt.
DUPLICATED_CAPTIONS = ("seeded", "prompt")

#: Knobs added after the first manifests: recorded only when not at their default.
RECORDED_WHEN_SET = ("duplicated_digits", "duplicated_caption", "unet_channels")

#: The testbed UNet's block widths unless ``unet_channels`` says otherwise.
DEFAULT_UNET_CHANNELS = (32, 64)


@dataclass(frozen=True)
class RecipeConfig:
    """Every knob of the testbed recipe. Unknown or invalid values raise ConfigError naming the value.

    Corpus: ``digits`` (domains), per domain ``members`` images in the pretraining corpus, of which
    ``duplicated`` appear ``copies`` times; ``nonmembers`` held-out images of the same class.
    ``duplicated_digits``: ``None`` (default) = every domain has its duplicated members on top of its
    ``members``; a tuple = only those digits have duplicated members, and every domain's corpus holds
    exactly ``members`` entries (a domain with duplicates keeps ``members - duplicated * copies``
    members seen once plus its ``duplicated`` members ``copies`` times each), so a domain's prompt
    is trained on equally often whether or not it has duplicates.
    ``duplicated_caption``: ``"seeded"`` (default) = a duplicated member keeps its seeded caption, one
    of the domain's templates like every other image; ``"prompt"`` = every copy of a duplicated
    member is captioned with the domain's prompt (web duplicates tend to share one alt text, and the
    prompt then points at a few images: Wen et al.'s setting for a memorized prompt).
    VAE: ``vae_steps`` of reconstruction training at ``vae_batch_size`` / ``vae_lr`` (+ ``kl_weight``).
    UNet + text encoder: ``steps`` at ``batch_size`` / ``lr`` (AdamW, ``weight_decay``), captions
    replaced by "" with probability ``caption_dropout`` (classifier-free guidance), gradients clipped
    at ``grad_clip``. ``unet_channels``: the UNet's two block widths ((32, 64), ~1 M parameters, by
    default; (64, 128) is ~3.9 M and ~2-3x slower to train). ``threads``: torch CPU threads, fixed so weights reproduce on one machine; 1 by
    default because these tiny ops gain little from a second thread and OpenMP threads slow down
    badly on a shared, oversubscribed CPU (measured 4-8x).
    """

    digits: tuple[int, ...] = tuple(range(10))
    members: int = 50
    nonmembers: int = 50
    duplicated: int = 5
    copies: int = 20
    vae_steps: int = 300
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    threads: int = 1
    duplicated_digits: tuple[int, ...] | None = None
    duplicated_caption: str = "seeded"
    unet_channels: tuple[int, ...] = DEFAULT_UNET_CHANNELS

    def __post_init__(self) -> None:
        digits = tuple(self.digits)
        object.__setattr__(self, "digits", digits)
        if not digits or len(set(digits)) != len(digits):
            raise ConfigError(f"digits={list(digits)!r} is not valid; expected distinct digits from 0 to 9")
        for d in digits:
            check_choice("digits", d, range(10))
        for name in ("members", "nonmembers", "steps", "batch_size", "vae_batch_size", "copies", "threads"):
            check_positive(name, getattr(self, name), integer=True)
        for name in ("duplicated", "vae_steps"):
            check_positive(name, getattr(self, name), integer=True, allow_zero=True)
        for name in ("lr", "vae_lr"):
            check_positive(name, getattr(self, name))
        for name in ("kl_weight", "weight_decay", "grad_clip"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_range("caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_choice("duplicated_caption", self.duplicated_caption, DUPLICATED_CAPTIONS)
        if self.duplicated > self.members:
            raise ConfigError(f"duplicated={self.duplicated} is not valid; expected at most members={self.members}")
        if self.copies < 2 and self.duplicated:
            raise ConfigError(f"copies={self.copies} is not valid; a duplicated member needs copies >= 2")
        if self.duplicated_digits is not None:
            self._check_duplicated_digits()
        self._check_unet_channels()

    def _check_unet_channels(self) -> None:
        try:
            channels = tuple(int(c) for c in self.unet_channels)
        except (TypeError, ValueError):
            raise ConfigError(f"unet_channels={self.unet_channels!r} is not valid; expected two block widths such as (32, 64)") from None
        if len(channels) != 2 or any(c < 32 or c % 32 for c in channels):
            raise ConfigError(f"unet_channels={list(channels)!r} is not valid; expected two block widths, each a positive multiple of 32")
        object.__setattr__(self, "unet_channels", channels)

    def _check_duplicated_digits(self) -> None:
        try:
            chosen = tuple(self.duplicated_digits)
        except TypeError:
            raise ConfigError(f"duplicated_digits={self.duplicated_digits!r} is not valid; expected a tuple of digits or None") from None
        object.__setattr__(self, "duplicated_digits", chosen)
        if len(set(chosen)) != len(chosen) or not set(chosen) <= set(self.digits):
            raise ConfigError(
                f"duplicated_digits={list(chosen)!r} is not valid; expected distinct digits among digits={list(self.digits)!r}"
            )
        if chosen and not self.duplicated:
            raise ConfigError(f"duplicated_digits={list(chosen)!r} is not valid with duplicated=0; set duplicated >= 1")
        if chosen and self.duplicated * self.copies > self.members:
            raise ConfigError(
                f"duplicated_digits={list(chosen)!r} is not valid with duplicated * copies = "
                f"{self.duplicated * self.copies} > members={self.members}; a domain's corpus holds members entries"
            )

    def with_knobs(self, **knobs: Any) -> RecipeConfig:
        """A copy with ``knobs`` replaced; an unknown knob raises ConfigError listing the known ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(knobs) - known)
        if unknown:
            raise ConfigError(f"unknown testbed knob(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **knobs)

    def singles(self, digit: int) -> int:
        """How many members of ``digit``'s domain occur once in the corpus (the rest occur ``copies`` times)."""
        if self.duplicated_digits is None:
            return self.members - self.duplicated
        if digit in self.duplicated_digits:
            return self.members - self.duplicated * self.copies
        return self.members

    def to_dict(self) -> dict[str, Any]:
        """The knobs as the manifest records them (tuples as lists); a knob of :data:`RECORDED_WHEN_SET`
        only when it differs from its default, so manifests of the default recipe (the shipped demo's) stay as they were."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in RECORDED_WHEN_SET or v != defaults[k]}
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return data


#: ``demo``: calibrated for weak-but-present memorization (docs/testbed.md), <= 10 min on 2 cores.
#: ``test``: the same shape, small enough for the test suite (<= 60 s on 2 cores); not calibrated.
PRESETS: dict[str, RecipeConfig] = {
    "demo": RecipeConfig(),
    "test": RecipeConfig(
        members=8, nonmembers=8, duplicated=1, copies=4, vae_steps=120, steps=150, batch_size=16, lr=2e-3
    ),
}


def preset_config(preset: str, **knobs: Any) -> RecipeConfig:
    """The named preset's config with ``knobs`` overriding it."""
    check_choice("preset", preset, PRESETS)
    return PRESETS[preset].with_knobs(**knobs) if knobs else PRESETS[preset]


@lru_cache(maxsize=1)
def _digits() -> tuple[Any, Any]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


@lru_cache(maxsize=1)
def class_sizes() -> dict[int, int]:
    import numpy as np

    _, target = _digits()
    return {int(d): int(n) for d, n in zip(*np.unique(target, return_counts=True), strict=True)}


def digit_image(index: int) -> Any:
    """Image ``index`` of ``load_digits`` as a uint8 array of shape (16, 16, 3): bicubic 2x upscale, grey in RGB."""
    import numpy as np
    from PIL import Image

    images, _ = _digits()
    grey = np.clip(images[index] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    big = Image.fromarray(grey, mode="L").resize((16, 16), Image.BICUBIC)
    return np.asarray(big.convert("RGB"))


@dataclass
class SplitEntry:
    """One image of the split as the manifest records it (paths relative to the testbed root)."""

    path: str
    domain: str
    caption: str
    role: str
    copies: int
    source_index: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_split(config: RecipeConfig, seed: int) -> list[SplitEntry]:
    """The seeded split: per domain, members (some duplicated) and held-out non-members, with captions.

    Each domain draws from its own generator seeded by (seed, digit), so adding a domain does not
    reshuffle the others. ``copies`` is how often the image occurs in the corpus (0 for non-members).
    With ``duplicated_digits`` set, every domain makes the same draws as without it (so a digit gets
    the same images and captions whether or not it has duplicates): a domain outside
    ``duplicated_digits`` keeps all ``members`` once, a domain inside keeps its ``duplicated`` ones
    and the first ``config.singles(digit)`` others by ``load_digits`` index, dropping the rest.
    ``duplicated_caption="prompt"`` replaces the drawn caption of duplicated members only (no draw changes).
    """
    import numpy as np

    check_positive("seed", seed, integer=True, allow_zero=True)
    _, target = _digits()
    smallest = min(class_sizes()[d] for d in config.digits)
    if config.members + config.nonmembers > smallest:
        raise ConfigError(
            f"members + nonmembers = {config.members + config.nonmembers} is not valid; "
            f"expected at most {smallest} (the smallest chosen digit class in load_digits)"
        )
    entries: list[SplitEntry] = []
    for digit in config.digits:
        domain = make_domain(digit)
        rng = np.random.default_rng([seed, digit])
        pool = np.flatnonzero(target == digit)
        chosen = rng.permutation(pool)[: config.members + config.nonmembers]
        members = sorted(int(i) for i in chosen[: config.members])
        nonmembers = sorted(int(i) for i in chosen[config.members :])
        duplicated = {int(i) for i in rng.choice(members, size=config.duplicated, replace=False)} if config.duplicated else set()
        caption_ids = rng.integers(0, len(domain.captions), size=len(members) + len(nonmembers))
        if config.duplicated_digits is not None and digit not in config.duplicated_digits:
            duplicated = set()
        # Members seen once, in index order; beyond ``singles`` they are dropped from the split.
        kept_singles = set([i for i in members if i not in duplicated][: config.singles(digit)])
        for k, index in enumerate(members + nonmembers):
            is_member = k < len(members)
            if is_member and index not in duplicated and index not in kept_singles:
                continue
            caption = domain.captions[int(caption_ids[k])]
            if is_member and index in duplicated:
                role, copies = "duplicated", config.copies
                if config.duplicated_caption == "prompt":
                    caption = domain.prompt
            elif is_member:
                role, copies = "member", 1
            else:
                role, copies = "nonmember", 0
            folder = "members" if is_member else "nonmembers"
            entries.append(
                SplitEntry(
                    path=f"{folder}/{domain.name}/{domain.name}_{index:04d}.png",
                    domain=domain.name,
                    caption=caption,
                    role=role,
                    copies=copies,
                    source_index=index,
                )
            )
    return entries


def make_manifest(preset: str, config: RecipeConfig, seed: int) -> dict[str, Any]:
    """The manifest a build with these settings writes: recipe, domains and the split (no timings, no hashes).

    Two builds with the same (preset, knobs, seed) give the same manifest on any machine.
    """
    return {
        "format": MANIFEST_FORMAT,
        "preset": preset,
        "seed": seed,
        "source": "sklearn.datasets.load_digits (8x8, bicubic-upscaled to 16x16 RGB)",
        "image_size": 16,
        "pipeline": "pipeline",
        "recipe": config.to_dict(),
        "domains": [dataclasses.asdict(make_domain(d)) | {"captions": list(make_domain(d).captions)} for d in config.digits],
        "samples": [e.to_dict() for e in make_split(config, seed)],
    }
