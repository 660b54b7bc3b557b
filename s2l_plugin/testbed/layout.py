"""A built testbed on disk: manifest, pipeline folder, member / non-member image folders.

Layout::

    <root>/manifest.json            recipe, domains and the split (see corpus.make_manifest)
    <root>/build.json               timings, losses, weight hash, library versions (machine-specific)
    <root>/pipeline/                a diffusers StableDiffusionPipeline folder
    <root>/members/<domain>/*.png   + metadata.jsonl (file_name, text): the pretraining corpus, once per image
    <root>/nonmembers/<domain>/*.png + metadata.jsonl: held-out images of the same classes

Reading a testbed needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.testbed.corpus import MANIFEST_FORMAT, Domain

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline

#: Where the shipped demo testbed lives inside the installed package.
SHIPPED_DEMO = Path(__file__).resolve().parent / "data" / "demo"
REBUILD_COMMAND = "s2l testbed build --preset demo --out s2l_plugin/testbed/data/demo"


@dataclass(frozen=True)
class Sample:
    """One real image of the testbed.

    ``role`` is "member" (in the pretraining corpus once), "duplicated" (a member that occurs
    ``copies`` times) or "nonmember" (held out, ``copies`` 0). ``path`` is absolute.
    ``source_index`` is the image's index in scikit-learn's ``load_digits``.
    """

    path: Path
    domain: str
    caption: str
    role: str
    copies: int
    source_index: int = -1

    @property
    def is_member(self) -> bool:
        return self.role != "nonmember"


class Testbed:
    """A built testbed: its pipeline folder, domains and ground-truth members / non-members / duplicates."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.domains = [
            Domain(name=d["name"], digit=int(d["digit"]), prompt=d["prompt"], captions=tuple(d["captions"]))
            for d in manifest["domains"]
        ]
        self._samples = [
            Sample(
                path=self.path / s["path"],
                domain=s["domain"],
                caption=s["caption"],
                role=s["role"],
                copies=int(s["copies"]),
                source_index=int(s.get("source_index", -1)),
            )
            for s in manifest["samples"]
        ]

    @classmethod
    def load(cls, path: Path | str | None = None) -> Testbed:
        """Open the testbed at ``path`` (a folder holding manifest.json); ``None`` = the shipped demo testbed."""
        root = SHIPPED_DEMO if path is None else Path(path)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            if path is None:
                raise InputError(f"the shipped demo testbed is missing at {root}; rebuild it with: {REBUILD_COMMAND}")
            raise InputError(f"testbed folder {str(root)!r} has no manifest.json; expected a folder written by `s2l testbed build`")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"testbed manifest {str(manifest_path)!r} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise InputError(f"testbed manifest {str(manifest_path)!r} has format {found!r}; expected {MANIFEST_FORMAT!r}")
        return cls(root, manifest)

    # -- what a user asks of it ------------------------------------------------------------------

    @property
    def pipeline_dir(self) -> Path:
        """The diffusers StableDiffusionPipeline folder (usable as ``--pretrained_model_name_or_path``)."""
        return self.path / self.manifest.get("pipeline", "pipeline")

    @property
    def preset(self) -> str:
        return str(self.manifest["preset"])

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def build_info(self) -> dict[str, Any]:
        """Machine-specific facts of the build (timings, losses, weight hash); empty if build.json is absent."""
        info = self.path / "build.json"
        return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}

    def domain(self, key: str | int | Domain) -> Domain:
        """The domain named ``key`` ("seven"), with digit ``key`` (7), or ``key`` itself if a Domain of this testbed."""
        for d in self.domains:
            if d == key or d.name == key or (isinstance(key, int) and not isinstance(key, bool) and d.digit == key):
                return d
        names = ", ".join(d.name for d in self.domains)
        raise ConfigError(f"domain={key!r} is not in this testbed; expected one of: {names}")

    def samples(self, domain: str | int | Domain | None = None, roles: tuple[str, ...] | None = None) -> list[Sample]:
        """Samples of ``domain`` (all domains if None) whose role is in ``roles`` (all if None), in manifest order."""
        name = None if domain is None else self.domain(domain).name
        return [s for s in self._samples if (name is None or s.domain == name) and (roles is None or s.role in roles)]

    def members(self, domain: str | int | Domain | None = None) -> list[Sample]:
        """Every image in the pretraining corpus, duplicated members included (each listed once)."""
        return self.samples(domain, ("member", "duplicated"))

    def nonmembers(self, domain: str | int | Domain | None = None) -> list[Sample]:
        """Held-out images of the same classes, never trained on."""
        return self.samples(domain, ("nonmember",))

    def duplicates(self, domain: str | int | Domain | None = None) -> list[Sample]:
        """Members that occur ``copies`` (> 1) times in the corpus."""
        return self.samples(domain, ("duplicated",))

    def load_pipeline(self, *, device: str | None = None, dtype: Any = None) -> StableDiffusionPipeline:
        """The testbed's pipeline, loaded with :func:`s2l_plugin.pipeline.load_pipeline`."""
        from s2l_plugin.pipeline import load_pipeline

        return load_pipeline(self.pipeline_dir, device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"Testbed(path={str(self.path)!r}, preset={self.manifest.get('preset')!r}, domains={len(self.domains)})"
