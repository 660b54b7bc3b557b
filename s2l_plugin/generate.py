"""The S2L synthetic private set: prompt the pretrained model with a target domain, keep its generations.

This is step 1 of Shake-to-Leak (Li et al., arXiv 2403.09450, section 3), made reproducible and safe to
interrupt:

- **Prompts.** ``templates`` (default the reference's ``"photo of {domain}"`` / ``"face of {domain}"``)
  are drawn with ``template_weights`` (default: 0.7 / 0.3 for those two, uniform for other lists).
  ``template_choice="per_domain"`` (the reference's rule) draws one template for the whole set from a seed derived from ``(seed, domain)``;
  ``"per_image"`` draws one per image from that image's seed. The template and the full prompt of
  every image are recorded. An optional ``quality_suffix`` is appended (:data:`REFERENCE_QUALITY_SUFFIX`
  is the reference's; off by default, since the testbed's 40-character tokenizer would truncate it).
- **Seeds.** Image ``i`` gets ``seed_i = image_seed(seed, domain, i)`` and its own CPU
  ``torch.Generator``; a batch passes the list of its generators to the pipeline
  (``generator=[...]``), so each image's initial latents and sampler noise depend on its seed only.
  Batches always cover the same fixed grid of indices ``[k*B, (k+1)*B)`` (also when resuming or when
  split across processes), so every image is computed in the same batch composition and a rerun on
  the same device reproduces it bit for bit. (On the CPU the testbed's images are also identical
  across batch sizes, but kernels need not promise that, so ``batch_size`` is one of the settings a
  resume must match.)
- **Quality control.** Candidates are judged in index order: near-constant images (pixel standard
  deviation in [0, 1] units below ``drop_blank``; a safety-checker black-out has 0) and, when
  ``dedup`` is set, near-duplicates of an earlier kept image (normalized l2 on a <=32x32 thumbnail in
  [-1, 1] below ``dedup``) are dropped. The set is the first ``num_images`` kept candidates; dropped
  indices are replaced by further indices, so the set always has ``num_images`` images.
- **Layouts.** ``dreambooth`` and ``textual_inversion``: ``OUT/images/`` holds images only (their
  training datasets open every file of the folder); ``imagefolder``: ``OUT/images/`` plus
  ``metadata.jsonl`` (``file_name``, ``text``); ``kohya``: ``OUT/images/<repeats>_<name>/`` with a
  caption file beside each image, in ``caption_extension`` (``.txt``; kohya's own default is ``.caption``). The manifest ``OUT/manifest.json`` sits beside the image
  folder, never inside it. Temporary files live in ``OUT/.s2l-partial/``, never in the image folder.
- **Resume.** Every file is written to a temporary path and renamed. The manifest is rewritten after
  each batch with ``complete: false``; a rerun with the same settings skips what is done and finishes
  the set; a rerun with other settings into the same folder is refused unless ``overwrite``.
- **Several processes** (``accelerate launch``): the grid's batches are dealt round-robin to the
  processes (:func:`partition_batches`), images are gathered to every process, judged identically and
  written by the main process, so the set equals a single-process run.

Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_write_bytes
from s2l_plugin.conditioning import denoiser
from s2l_plugin.config import (
    check_choice,
    check_positive,
    check_range,
    from_dict,
    library_versions,
    to_json_dict,
)
from s2l_plugin.defaults import GENERATE_GUIDANCE_SCALE, GENERATE_NUM_IMAGES, GENERATE_NUM_INFERENCE_STEPS
from s2l_plugin.errors import ConfigError, InputError, S2LError
from s2l_plugin.hooks import hookimpl

MANIFEST_NAME = "manifest.json"
IMAGE_DIR_NAME = "images"
PARTIAL_DIR_NAME = ".s2l-partial"
MANIFEST_FORMAT = "s2l-private-set/1"

LAYOUTS = ("dreambooth", "imagefolder", "kohya", "textual_inversion")
TEMPLATE_CHOICES = ("per_domain", "per_image")
DTYPES = ("float32", "float16", "bfloat16")

#: Sampler names and the diffusers scheduler class each one means.
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm_single": "DPMSolverSinglestepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}
#: The samplers of a flow-matching model (SD3, Flux) and the class each name means there. Deterministic
#: DDIM written for x_t = (1 − σ)·x0 + σ·ε is exactly an Euler step of the flow ODE, so "ddim" (the
#: default) samples a flow-matching model with its own Euler sampler.
FLOW_SCHEDULERS: dict[str, str] = {
    "ddim": "FlowMatchEulerDiscreteScheduler",
    "euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
}

#: The reference sp_gen.py's prompt templates and their probabilities (one draw per domain).
REFERENCE_TEMPLATES = ("photo of {domain}", "face of {domain}")
REFERENCE_TEMPLATE_WEIGHTS = (0.7, 0.3)
#: The reference sp_gen.py's quality suffix (opt in with ``quality_suffix=REFERENCE_QUALITY_SUFFIX``).
REFERENCE_QUALITY_SUFFIX = (
    ", dslr, ultra quality, sharp focus, tack sharp, dof, film grain, Fujifilm XT3, crystal clear, 8K UHD"
)
#: The reference sp_gen.py's negative prompt (opt in with ``negative_prompt=REFERENCE_NEGATIVE_PROMPT``).
REFERENCE_NEGATIVE_PROMPT = "disfigured, ugly, bad, immature, cartoon, anime, 3d, painting, b&w"

#: Generation stops with QualityError after this many candidates per requested image.
MAX_CANDIDATES_FACTOR = 4

# Names of the files this module writes for one image (the sweep at the end touches only these).
_CAPTION_EXT = re.compile(r"^\.[A-Za-z0-9_\-]+$")
_OWN_FILE = re.compile(r"^\d{6,}\.[A-Za-z0-9_\-]+$")
# Thumbnail side for de-duplication: large images are compared at this size (area average).
_DEDUP_SIDE = 32


class QualityError(S2LError):
    """Quality control rejected so many candidates that the set cannot be completed."""


@dataclass
class GenerationConfig:
    """Settings of one synthetic private set (validated on construction; bad values raise ConfigError).

    ``seed`` is the base seed; per-image seeds derive from it (:func:`image_seed`). ``height`` /
    ``width`` None mean the model's default resolution. ``drop_blank`` (None or 0 = off) and
    ``dedup`` (None = off) are thresholds described in the module docstring. ``dtype`` None keeps the
    pipeline's dtype; ``device`` None uses accelerate's device for this process (CUDA when present).
    """

    domain: str
    num_images: int = GENERATE_NUM_IMAGES
    templates: list[str] = field(default_factory=lambda: list(REFERENCE_TEMPLATES))
    template_weights: list[float] | None = None
    template_choice: str = "per_domain"
    quality_suffix: str | None = None
    negative_prompt: str | None = None
    scheduler: str = "ddim"
    num_inference_steps: int = GENERATE_NUM_INFERENCE_STEPS
    guidance_scale: float = GENERATE_GUIDANCE_SCALE
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 8
    layout: str = "dreambooth"
    kohya_repeats: int = 10
    caption_extension: str = ".txt"
    safety_checker: bool = False
    drop_blank: float | None = 0.01
    dedup: float | None = None
    dtype: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or not self.domain.strip():
            raise ConfigError(f"domain={self.domain!r} is not valid; expected a non-empty string")
        check_positive("num_images", self.num_images, integer=True)
        if isinstance(self.templates, str):
            self.templates = [self.templates]
        if not isinstance(self.templates, (list, tuple)) or not self.templates:
            raise ConfigError(f"templates={self.templates!r} is not valid; expected a non-empty list of strings")
        self.templates = list(self.templates)
        for template in self.templates:
            _check_template(template)
        if self.template_weights is not None:
            weights = list(self.template_weights)
            if len(weights) != len(self.templates):
                raise ConfigError(
                    f"template_weights={weights!r} is not valid; expected {len(self.templates)} weights, one per template"
                )
            for w in weights:
                check_positive("template_weights", w, allow_zero=True)
            if sum(weights) <= 0:
                raise ConfigError(f"template_weights={weights!r} is not valid; expected weights with a positive sum")
            self.template_weights = [float(w) for w in weights]
        check_choice("template_choice", self.template_choice, TEMPLATE_CHOICES)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_positive("num_inference_steps", self.num_inference_steps, integer=True)
        check_positive("guidance_scale", self.guidance_scale, allow_zero=True)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value, integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed={self.seed!r} is not valid; expected an integer in [0, 2**63)")
        check_positive("batch_size", self.batch_size, integer=True)
        check_choice("layout", self.layout, LAYOUTS)
        check_positive("kohya_repeats", self.kohya_repeats, integer=True)
        if not isinstance(self.caption_extension, str) or not _CAPTION_EXT.match(self.caption_extension) \
                or self.caption_extension.lower() == ".png":
            raise ConfigError(f"caption_extension={self.caption_extension!r} is not valid; expected a file suffix such as .txt or .caption")
        if not isinstance(self.safety_checker, bool):
            raise ConfigError(f"safety_checker={self.safety_checker!r} is not valid; expected true or false")
        if self.drop_blank is not None:
            check_range("drop_blank", self.drop_blank, 0.0, 0.5)
        if self.dedup is not None:
            check_range("dedup", self.dedup, 0.0, 2.0)
        if self.dtype is not None:
            check_choice("dtype", self.dtype, DTYPES)
        for name in ("quality_suffix", "negative_prompt", "device"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}={value!r} is not valid; expected a string")

    def weights(self) -> list[float]:
        """The template probabilities in use: ``template_weights``; when None, the reference's 0.7 / 0.3
        for the reference templates and uniform for any other list."""
        if self.template_weights is not None:
            total = sum(self.template_weights)
            return [w / total for w in self.template_weights]
        if tuple(self.templates) == REFERENCE_TEMPLATES:
            return list(REFERENCE_TEMPLATE_WEIGHTS)
        return [1.0 / len(self.templates)] * len(self.templates)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the images (everything but ``num_images`` and ``device``).

        A rerun whose identity matches an existing set's resumes or extends it; any other is refused.
        """
        data = to_json_dict(self, stamp=False)
        data["template_weights"] = self.weights()  # None and the explicit defaults are the same draw
        data.pop("num_images")
        data.pop("device")
        if self.caption_extension == ".txt":  # sets written before the option existed keep their identity
            data.pop("caption_extension")
        return data


@dataclass(frozen=True)
class GeneratedImage:
    """One kept image of a set: its index on the seed grid, seed, template, prompt and file."""

    index: int
    seed: int
    template: str
    prompt: str
    path: Path


@dataclass
class GeneratedSet:
    """A synthetic private set on disk.

    ``image_dir`` is what a trainer's data argument takes (for kohya, the parent of
    ``<repeats>_<name>/``). ``dropped`` counts candidates removed by quality control, by reason.
    """

    out_dir: Path
    image_dir: Path
    manifest_path: Path
    layout: str
    records: list[GeneratedImage]
    negative_prompt: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    complete: bool = True

    @property
    def count(self) -> int:
        return len(self.records)

    @property
    def prompts(self) -> list[str]:
        """The distinct prompts of the set, in order of first use."""
        return list(dict.fromkeys(r.prompt for r in self.records))

    @property
    def prompt(self) -> str | None:
        """The set's prompt when all images share one (the reference rule), else None."""
        prompts = self.prompts
        return prompts[0] if len(prompts) == 1 else None

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.records]


# -- pure helpers --------------------------------------------------------------------------------


def _check_template(template: Any) -> None:
    if not isinstance(template, str) or not template.strip():
        raise ConfigError(f"template {template!r} is not valid; expected a non-empty string")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"template {template!r} is not valid ({exc}); expected text with an optional {{domain}}") from exc
    bad = [name for name in fields if name != "domain"]
    if bad:
        raise ConfigError(f"template {template!r} is not valid; the only placeholder allowed is {{domain}}, got {{{bad[0]}}}")


def slugify(name: str) -> str:
    """A folder-safe form of a domain name: lower case, runs of other characters become ``_``."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug or "domain"


def _derive(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def image_seed(seed: int, domain: str, index: int) -> int:
    """The seed of image ``index``: the first 8 bytes of sha256(f"{seed}/{domain}/{index}") mod 2**63.

    Independent of batch size, process count and resume; different domains get different noise.
    """
    return _derive(seed, domain, index)


def choose_template(config: GenerationConfig, index: int) -> str:
    """The template image ``index`` uses under ``config.template_choice`` (see the module docstring)."""
    import numpy as np

    if len(config.templates) == 1:
        return config.templates[0]
    weights = np.asarray(config.weights(), dtype=np.float64)
    if config.template_choice == "per_domain":
        key = _derive(config.seed, config.domain, "template")
    else:
        key = _derive(image_seed(config.seed, config.domain, index), "template")
    rng = np.random.default_rng(key)
    return config.templates[int(rng.choice(len(config.templates), p=weights / weights.sum()))]


def build_prompt(config: GenerationConfig, template: str) -> str:
    """``template`` filled with the domain, plus the quality suffix when set."""
    return template.format(domain=config.domain) + (config.quality_suffix or "")


def batch_grid(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """The batches covering indices ``[start, stop)``, cut on the fixed grid ``[k*B, (k+1)*B)``."""
    batches: list[list[int]] = []
    i = start
    while i < stop:
        end = min(stop, (i // batch_size + 1) * batch_size)
        batches.append(list(range(i, end)))
        i = end
    return batches


def partition_batches(batches: Sequence[Sequence[int]], num_processes: int, process_index: int) -> list[list[int]]:
    """The batches process ``process_index`` of ``num_processes`` generates: every ``num_processes``-th one.

    The shares are disjoint, cover every batch, and differ in size by at most one batch.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} is not valid for num_processes={num_processes}")
    return [list(b) for b in batches[process_index::num_processes]]


def image_std(image: Any) -> float:
    """Pixel standard deviation of a uint8 HxWxC image, in [0, 1] units (0 = constant image)."""
    import numpy as np

    return float(np.asarray(image, dtype=np.float64).std() / 255.0)


def dedup_thumbnail(image: Any) -> Any:
    """The array de-duplication compares: the image in [-1, 1], area-averaged to at most 32x32, float32."""
    import numpy as np

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    h, w = arr.shape[:2]
    fh, fw = max(1, h // _DEDUP_SIDE), max(1, w // _DEDUP_SIDE)
    if fh > 1 or fw > 1:
        arr = arr[: h - h % fh, : w - w % fw]
        arr = arr.reshape(arr.shape[0] // fh, fh, arr.shape[1] // fw, fw, -1).mean(axis=(1, 3))
    return arr.reshape(-1)


def normalized_l2(a: Any, b: Any) -> Any:
    """``||a - b||_2 / sqrt(len)`` between flat arrays (b may be a stack [K, len]; then K distances)."""
    import numpy as np

    diff = np.asarray(b, dtype=np.float32) - np.asarray(a, dtype=np.float32)
    return np.sqrt((diff * diff).mean(axis=-1))


# -- files --------------------------------------------------------------------------------------


def _layout_dir(out_dir: Path, config: GenerationConfig) -> Path:
    """The folder the image files go into (for kohya, the ``<repeats>_<name>`` subset folder)."""
    image_dir = out_dir / IMAGE_DIR_NAME
    if config.layout == "kohya":
        return image_dir / f"{config.kohya_repeats}_{slugify(config.domain)}"
    return image_dir


def _png_bytes(image: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not a readable manifest ({exc}); remove it or pass --overwrite") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InputError(f"{str(path)!r} is not an s2l private-set manifest; expected format {MANIFEST_FORMAT!r}")
    return data


def load_generated_set(out_dir: str | Path) -> GeneratedSet:
    """The set written into ``out_dir`` by :func:`generate_private_set`, read from its manifest.

    Raises InputError when ``out_dir`` holds no manifest.
    """
    out_dir = Path(out_dir)
    data = _read_manifest(out_dir)
    if data is None:
        raise InputError(f"{str(out_dir)!r} holds no {MANIFEST_NAME}; expected a folder written by `s2l generate`")
    return _set_from_manifest(out_dir, data)


def _set_from_manifest(out_dir: Path, data: dict[str, Any]) -> GeneratedSet:
    records = [
        GeneratedImage(index=r["index"], seed=r["seed"], template=r["template"], prompt=r["prompt"], path=out_dir / r["file"])
        for r in data["records"]
        if r["status"] == "kept"
    ]
    quality = data.get("quality", {})
    return GeneratedSet(
        out_dir=out_dir,
        image_dir=out_dir / data["image_dir"],
        manifest_path=out_dir / MANIFEST_NAME,
        layout=data["config"]["layout"],
        records=records,
        negative_prompt=data["config"].get("negative_prompt"),
        dropped={k: quality.get(k, 0) for k in ("blank", "duplicate")},
        complete=bool(data.get("complete")),
    )


# -- model ----------------------------------------------------------------------------------------


def _load_model(model: str | os.PathLike[str], *, safety_checker: bool = False, allow_pickle: bool = False,
                config: str | os.PathLike[str] | None = None) -> Any:
    """A pipeline from a model argument (a pipeline folder, ``"testbed"``, or a single-file checkpoint with
    its ``config`` folder); InputError when missing.

    With ``safety_checker`` the folder's ``safety_checker/`` and ``feature_extractor/`` are loaded
    and attached (the shared loader leaves them out); ConfigError when the folder has none.
    """
    from s2l_plugin.pipeline import load_pipeline, resolve_model_dir

    pipe = load_pipeline(model, allow_pickle=allow_pickle, config=config)
    if safety_checker:
        if not hasattr(pipe, "safety_checker"):
            raise ConfigError(
                f"safety_checker=True is not valid for model {str(model)!r}; a {type(pipe).__name__} has no safety checker"
            )
        folder = resolve_model_dir(model)
        if not ((folder / "safety_checker").is_dir() and (folder / "feature_extractor").is_dir()):
            raise ConfigError(
                f"safety_checker=True is not valid for model {str(model)!r}; it has no safety_checker/ and feature_extractor/ folders"
            )
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker", local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor", local_files_only=True)
        pipe.register_modules(safety_checker=checker.to(pipe.device, denoiser(pipe).dtype), feature_extractor=processor)
    return pipe


def model_hash(pipeline: Any) -> str:
    """sha256 over the weights of the pipeline's denoiser (UNet or transformer), VAE and text encoder(s) (names, dtypes, shapes, bytes).

    Computed from the loaded modules, so a folder and the same pipeline built in memory hash alike.
    """
    import torch

    digest = hashlib.sha256()
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}.{key}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _vae_factor(pipe: Any) -> int:
    factor = getattr(pipe, "vae_scale_factor", None)
    if factor is None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(factor)


def _resolution(pipe: Any, config: GenerationConfig) -> tuple[int, int]:
    """(height, width) in pixels, checked: multiples of the VAE factor and of 8 (the pipeline's rule);
    on Flux also of twice the VAE factor (its latents are packed in 2x2 patches)."""
    from s2l_plugin.conditioning import default_resolution, pipeline_family

    factor = _vae_factor(pipe)
    default = default_resolution(pipe)
    height = config.height or default
    width = config.width or default
    multiple = factor * 8 // math.gcd(factor, 8)
    if pipeline_family(pipe) == "flux":
        multiple = multiple * 2 // math.gcd(multiple, 2)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ConfigError(
                f"{name}={value} is not valid; expected a multiple of {multiple} "
                f"(VAE factor {factor}; StableDiffusionPipeline needs multiples of 8)"
            )
    return height, width


def make_scheduler(pipe: Any, name: str) -> Any:
    """The named scheduler, configured from the pipeline's own scheduler config (its betas, offsets;
    a flow-matching model's shift). On SD3/Flux the names of :data:`FLOW_SCHEDULERS` apply and any
    other is a ConfigError."""
    import diffusers

    from s2l_plugin.conditioning import FLOW_FAMILIES, pipeline_family

    check_choice("scheduler", name, SCHEDULERS)
    family = pipeline_family(pipe)
    if family in FLOW_FAMILIES:
        if name not in FLOW_SCHEDULERS:
            raise ConfigError(
                f"scheduler={name!r} is not valid for a {FLOW_FAMILIES[family]}; expected one of "
                f"{', '.join(FLOW_SCHEDULERS)} (flow-matching samplers)"
            )
        return getattr(diffusers, FLOW_SCHEDULERS[name]).from_config(pipe.scheduler.config)
    cls = getattr(diffusers, SCHEDULERS[name])
    return cls.from_config(pipe.scheduler.config)


def _check_writable(out_dir: Path) -> None:
    """InputError unless ``out_dir`` is (or can be created as) a writable folder; leaves nothing behind.

    Probes the nearest existing folder by creating and removing a temporary file (permission bits
    alone say nothing for root or for read-only mounts).
    """
    import tempfile

    probe = out_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output {str(out_dir)!r} is not valid; {str(probe)!r} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".s2l-probe-", dir=probe)
    except OSError as exc:
        raise InputError(f"output {str(out_dir)!r} is not writable ({exc.strerror or exc} in {str(probe)!r})") from exc
    os.close(fd)
    os.unlink(name)


# -- generation ------------------------------------------------------------------------------------


def fingerprint(config: GenerationConfig, model_digest: str) -> str:
    """sha256 of the image-deciding settings (:meth:`GenerationConfig.identity`) and the model hash."""
    payload = json.dumps({"config": config.identity(), "model": model_digest}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _process_state(device: str | None = None) -> tuple[int, int, Callable[[list[Any]], list[Any]], Callable[[], None], Any]:
    """(num_processes, process_index, gather, barrier, device) from accelerate's PartialState.

    Processes launched without a GPU (``accelerate launch --cpu``, or torchrun on a CPU machine) are
    joined over gloo; a launch that accelerate would otherwise see as one process per copy (each
    writing the same folder) is refused.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from s2l_plugin._dist import check_joined, cpu_launch

    state = PartialState(cpu=cpu_launch(device))
    check_joined(state.num_processes)
    if state.num_processes == 1:
        return 1, 0, (lambda items: items), (lambda: None), state.device
    return state.num_processes, state.process_index, gather_object, state.wait_for_everyone, state.device


def _torch_device(name: str) -> Any:
    import torch

    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not valid; expected a torch device such as cpu, cuda or cuda:1") from exc


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def generate_batch(pipe: Any, config: GenerationConfig, indices: Sequence[int], height: int, width: int) -> list[dict[str, Any]]:
    """Generate the candidates ``indices`` in one pipeline call; one dict per image, in order.

    Each dict has ``index``, ``seed``, ``template``, ``prompt``, ``image`` (uint8 HxWx3 array, rounded
    as diffusers' ``numpy_to_pil`` does) and ``nsfw`` (bool, or None without a safety checker).
    """
    import numpy as np
    import torch

    seeds = [image_seed(config.seed, config.domain, i) for i in indices]
    templates = [choose_template(config, i) for i in indices]
    prompts = [build_prompt(config, t) for t in templates]
    # CPU generators: the initial noise is the same on every device (diffusers draws it on the CPU
    # and moves it), and one generator per image keeps an image independent of its batch-mates.
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    negative = [config.negative_prompt] * len(indices) if config.negative_prompt else None
    with torch.inference_mode():
        out = pipe(
            prompt=prompts,
            negative_prompt=negative,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type="np",
        )
    images = (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)
    nsfw = getattr(out, "nsfw_content_detected", None)
    return [
        {
            "index": i,
            "seed": s,
            "template": t,
            "prompt": p,
            "image": images[k],
            "nsfw": (bool(nsfw[k]) if nsfw is not None else None),
        }
        for k, (i, s, t, p) in enumerate(zip(indices, seeds, templates, prompts, strict=True))
    ]


class _SetWriter:
    """The decided candidates of one set and the files that record them (writes only on the main process).

    ``records`` maps candidate index to its manifest record (status kept / blank / duplicate).
    """

    def __init__(self, out_dir: Path, config: GenerationConfig, header: dict[str, Any],
                 records: dict[int, dict[str, Any]], is_main: bool) -> None:
        self.out_dir = out_dir
        self.config = config
        self.header = header
        self.records = records
        self.is_main = is_main
        self.layout_dir = _layout_dir(out_dir, config)
        self.tmp_dir = out_dir / PARTIAL_DIR_NAME
        self.thumbs: list[Any] = []
        self.thumb_index: list[int] = []

    def kept(self, below: int | None = None) -> int:
        return sum(r["status"] == "kept" for i, r in self.records.items() if below is None or i < below)

    def start(self) -> None:
        """Create the folders, manifest first (a folder we touched always has our manifest)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.write_manifest(complete=False)
            self.layout_dir.mkdir(parents=True, exist_ok=True)
        if self.config.dedup is not None:  # earlier kept images are the references of later ones
            import numpy as np
            from PIL import Image

            for i in sorted(self.records):
                if self.records[i]["status"] == "kept":
                    with Image.open(self.out_dir / self.records[i]["file"]) as im:
                        self.thumbs.append(dedup_thumbnail(np.asarray(im.convert("RGB"))))
                    self.thumb_index.append(i)

    def judge(self, cand: dict[str, Any]) -> str:
        """'kept', 'blank' or 'duplicate' for one candidate (in index order); updates the references."""
        import numpy as np

        cand["std"] = round(image_std(cand["image"]), 6)
        if self.config.drop_blank and cand["std"] < self.config.drop_blank:
            return "blank"
        if self.config.dedup is not None:
            thumb = dedup_thumbnail(cand["image"])
            if self.thumbs:
                dists = normalized_l2(thumb, np.stack(self.thumbs))
                j = int(np.argmin(dists))
                if float(dists[j]) < self.config.dedup:
                    cand["duplicate_of"] = self.thumb_index[j]
                    return "duplicate"
            self.thumbs.append(thumb)
            self.thumb_index.append(cand["index"])
        return "kept"

    def accept(self, cand: dict[str, Any]) -> bool:
        """Judge a new candidate, write its files when kept; True when kept."""
        status = self.judge(cand)
        rec = {k: cand[k] for k in ("index", "seed", "template", "prompt", "nsfw")}
        rec.update(status=status, std=cand["std"], file=None)
        if "duplicate_of" in cand:
            rec["duplicate_of"] = cand["duplicate_of"]
        if status == "kept":
            path = self.layout_dir / f"{cand['index']:06d}.png"
            rec["file"] = str(path.relative_to(self.out_dir))
            if self.is_main:
                data = _png_bytes(cand["image"])
                rec["sha256"] = hashlib.sha256(data).hexdigest()
                if self.config.layout == "kohya":  # caption first: no image is ever without one
                    atomic_write_bytes(path.with_suffix(self.config.caption_extension), (cand["prompt"] + "\n").encode(), self.tmp_dir)
                atomic_write_bytes(path, data, self.tmp_dir)
        self.records[cand["index"]] = rec
        return status == "kept"

    def write_manifest(self, complete: bool) -> None:
        """Rewrite the manifest (and an imagefolder's metadata.jsonl) atomically from ``records``."""
        if not self.is_main:
            return
        ordered = [self.records[i] for i in sorted(self.records)]
        kept = [r for r in ordered if r["status"] == "kept"]
        statuses = [r["status"] for r in ordered]
        prompts: dict[str, int] = {}
        for r in kept:
            prompts[r["prompt"]] = prompts.get(r["prompt"], 0) + 1
        quality = {
            "candidates": len(ordered),
            "kept": len(kept),
            "blank": statuses.count("blank"),
            "duplicate": statuses.count("duplicate"),
            "nsfw_flagged": sum(bool(r.get("nsfw")) for r in ordered),
            "drop_blank": self.config.drop_blank,
            "dedup": self.config.dedup,
        }
        data = dict(self.header, complete=complete, prompts=prompts, quality=quality, records=ordered)
        atomic_write_bytes(self.out_dir / MANIFEST_NAME, (json.dumps(data, indent=1) + "\n").encode(), self.tmp_dir)
        if self.config.layout == "imagefolder" and kept:
            lines = "".join(json.dumps({"file_name": Path(r["file"]).name, "text": r["prompt"]}) + "\n" for r in kept)
            atomic_write_bytes(self.layout_dir / "metadata.jsonl", lines.encode(), self.tmp_dir)

    def finish(self, stop: int) -> None:
        """Drop candidates at or past ``stop``, remove orphan files, mark the manifest complete."""
        for i in [i for i in self.records if i >= stop]:
            del self.records[i]
        if not self.is_main:
            return
        expected = {Path(r["file"]).name for r in self.records.values() if r["status"] == "kept"}
        if self.config.layout == "kohya":
            expected |= {Path(n).with_suffix(self.config.caption_extension).name for n in expected}
        for path in self.layout_dir.iterdir():
            if _OWN_FILE.match(path.name) and path.name not in expected:
                path.unlink()  # an orphan of an interrupted or larger earlier run
        self.write_manifest(complete=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _existing_records(out_dir: Path, config: GenerationConfig, fp: str, overwrite: bool) -> dict[int, dict[str, Any]]:
    """Records of a same-settings set in ``out_dir`` to resume from; ConfigError when ``out_dir`` holds
    anything else and ``overwrite`` is false. Reads only."""
    existing = _read_manifest(out_dir) if out_dir.exists() else None
    if existing is not None and existing.get("fingerprint") == fp and not overwrite:
        records = {int(r["index"]): r for r in existing.get("records", [])}
        kept = sum(r["status"] == "kept" for r in records.values())
        if existing.get("complete") and kept > config.num_images:
            raise ConfigError(
                f"num_images={config.num_images} is not valid for {str(out_dir)!r}; it already holds a complete set "
                f"of {kept} images (pass overwrite to regenerate)"
            )
        # A kept record whose file vanished is not done: it is generated again.
        return {i: r for i, r in records.items() if r["status"] != "kept" or (out_dir / r["file"]).exists()}
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        what = f"a set generated with {_differences(existing, config, fp)}" if existing is not None else "other files"
        raise ConfigError(
            f"output {str(out_dir)!r} is not empty: it holds {what}; expected an empty folder, the same settings "
            "(to resume), or --overwrite"
        )
    return {}


def _differences(existing: dict[str, Any], config: GenerationConfig, fp: str) -> str:
    """What differs between an existing set's manifest and ``config``, e.g. "other settings (seed: 0 -> 1)"."""
    old = existing.get("identity", {})
    new = config.identity()
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
        return f"other settings ({'; '.join(changed)})"
    return "another model" if existing.get("fingerprint") != fp else "the same settings"


def _clear_previous_set(out_dir: Path) -> None:
    """Remove what an earlier set wrote into ``out_dir`` (only the names this module writes)."""
    for name in (MANIFEST_NAME, IMAGE_DIR_NAME, PARTIAL_DIR_NAME):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


@contextlib.contextmanager
def _prepared(pipe: Any, config: GenerationConfig, scheduler: Any, device: Any) -> Iterator[Any]:
    """The pipeline on ``device``/dtype with the chosen scheduler and safety checker, restored on exit."""
    saved_scheduler = pipe.scheduler
    saved_checker = getattr(pipe, "safety_checker", None)
    saved_progress = getattr(pipe, "_progress_bar_config", None)
    if config.dtype is not None:
        pipe.to(device, _torch_dtype(config.dtype))
    else:
        pipe.to(device)
    pipe.scheduler = scheduler
    if not config.safety_checker and saved_checker is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)  # our own bar counts images instead
    try:
        yield pipe
    finally:
        pipe.scheduler = saved_scheduler
        if saved_checker is not None:
            pipe.safety_checker = saved_checker
        if saved_progress is not None:
            pipe._progress_bar_config = saved_progress


def generate_private_set(
    pipeline_or_model: Any,
    config: GenerationConfig,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> GeneratedSet:
    """Generate (or finish) the synthetic private set of ``config`` into ``out_dir``.

    ``pipeline_or_model`` is a loaded StableDiffusionPipeline or a model argument (a pipeline folder
    or ``"testbed"``). A loaded pipeline is moved to the chosen device/dtype; its scheduler and
    safety checker are restored afterwards. Returns the complete set (``config.num_images`` images).

    Errors, raised before anything is written: InputError for a missing model or an unwritable
    output; ConfigError for a resolution that is not a multiple of the VAE factor (and of 8), or for
    ``out_dir`` holding a different set or other files when ``overwrite`` is false. QualityError when
    quality control rejects too many candidates (the partial set stays, resumable).
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    out_dir = Path(out_dir)
    _check_writable(out_dir)  # before loading: a model can take minutes to load
    if isinstance(pipeline_or_model, (str, os.PathLike)):
        model_source = str(pipeline_or_model)
        pipe = _load_model(pipeline_or_model, safety_checker=config.safety_checker)
    else:
        pipe = pipeline_or_model
        model_source = str(getattr(pipe, "name_or_path", "") or "<in-memory pipeline>")
    height, width = _resolution(pipe, config)
    if config.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise ConfigError("safety_checker=True is not valid for this model; it has no safety checker")
    scheduler = make_scheduler(pipe, config.scheduler)
    digest = model_hash(pipe)
    fp = fingerprint(config, digest)
    num_processes, rank, gather, barrier, auto_device = _process_state(config.device)
    device = _torch_device(config.device) if config.device else auto_device
    records = _existing_records(out_dir, config, fp, overwrite)

    # Everything is checked: from here on files are written.
    barrier()  # every process has read the old state before the main process changes it
    if rank == 0 and overwrite and not records:
        _clear_previous_set(out_dir)
    with _prepared(pipe, config, scheduler, device):
        header = {
            "format": MANIFEST_FORMAT,
            "fingerprint": fp,
            "config": to_json_dict(config, stamp=False),
            "identity": config.identity(),
            "image_dir": IMAGE_DIR_NAME,
            "layout_dir": str(_layout_dir(out_dir, config).relative_to(out_dir)),
            "model": {"source": model_source, "sha256": digest, "pipeline_class": type(pipe).__name__},
            "sampler": {
                "scheduler": config.scheduler,
                "scheduler_class": type(scheduler).__name__,
                "scheduler_config": dict(scheduler.config),
                "num_inference_steps": config.num_inference_steps,
                "guidance_scale": config.guidance_scale,
                "height": height,
                "width": width,
                "dtype": str(denoiser(pipe).dtype).replace("torch.", ""),
                "device": str(device),
                "num_processes": num_processes,
                "generator": "one CPU torch.Generator per image, seeded with the recorded seed",
            },
            "negative_prompt": config.negative_prompt,
            "template_probabilities": dict(zip(config.templates, config.weights(), strict=True)),
            "versions": library_versions(),
        }
        writer = _SetWriter(out_dir, config, header, records, is_main=rank == 0)
        writer.start()
        barrier()

        from s2l_plugin.progress import progress_bar

        bar = progress_bar(total=config.num_images, initial=min(writer.kept(), config.num_images), unit="img",
                           desc=f"generating {config.domain!r}", disable=not (progress and rank == 0))
        # Round 1 covers indices [0, N); each later round replaces what quality control dropped.
        start, stop = 0, config.num_images
        while True:
            todo = [b for b in batch_grid(start, stop, config.batch_size) if any(i not in records for i in b)]
            for wave in range(0, len(todo), num_processes):
                share = todo[wave : wave + num_processes]
                mine = share[rank] if rank < len(share) else None
                produced = generate_batch(pipe, config, mine, height, width) if mine else []
                # Every process receives every candidate of the wave and judges them identically.
                for cand in sorted(gather(produced), key=lambda c: c["index"]):
                    # A candidate done before an interruption keeps what is on disk.
                    if cand["index"] not in records and writer.accept(cand):
                        bar.update(1)
                writer.write_manifest(complete=False)
            kept = writer.kept(below=stop)
            if kept >= config.num_images:
                break
            if stop >= MAX_CANDIDATES_FACTOR * config.num_images:
                # Endless replacement would hide a broken model or a threshold that rejects everything.
                raise QualityError(
                    f"quality control kept {kept} of {stop} candidates for {config.domain!r} "
                    f"(drop_blank={config.drop_blank}, dedup={config.dedup}); expected {config.num_images}: "
                    "lower the thresholds or check the model"
                )
            start, stop = stop, stop + (config.num_images - kept)
        bar.close()
        writer.finish(stop)
        barrier()
    return load_generated_set(out_dir)


# -- hook -----------------------------------------------------------------------------------------


# Keys of run.options["generate"] that steer the hook rather than the images.
_HOOK_ONLY_OPTIONS = ("out", "overwrite", "progress")


def config_from_run(run: Any) -> GenerationConfig:
    """The GenerationConfig of a Run: ``run.options["generate"]`` (GenerationConfig fields), then
    ``run.domain``; ``run.prompt``, when set, is the single template (``{domain}`` allowed).

    ConfigError when the run names no domain or an option is unknown or invalid.
    """
    options = dict((run.options or {}).get("generate") or {})
    if run.domain and "domain" not in options:
        options["domain"] = run.domain
    if run.prompt and "templates" not in options:
        options["templates"] = [run.prompt]
    if "domain" not in options:
        raise ConfigError("run.domain=None is not valid for generation; expected the target domain's name")
    for key in _HOOK_ONLY_OPTIONS:
        options.pop(key, None)
    return from_dict(GenerationConfig, options)


def default_out_dir(run: Any) -> Path:
    """Where the hook writes: ``run.options["generate"]["out"]``, else ``run.data_dir``, else
    ``run.output_dir / "s2l-private-set"``."""
    options = (run.options or {}).get("generate") or {}
    if options.get("out"):
        return Path(options["out"])
    if run.data_dir is not None:
        return Path(run.data_dir)
    if run.output_dir is None:
        raise ConfigError("run.output_dir=None is not valid for generation; expected an output folder or run.data_dir")
    return Path(run.output_dir) / "s2l-private-set"


@hookimpl
def s2l_generate_private_set(run: Any, pipeline: Any) -> GeneratedSet:
    """Default generation: build the config from ``run``, generate into :func:`default_out_dir`.

    ``pipeline`` None loads ``run.base_model``. Records the set in ``run.state["private_set"]``; the
    trainer's data folder is ``run.state["private_set"].image_dir``.
    """
    config = config_from_run(run)
    options = (run.options or {}).get("generate") or {}
    model = pipeline if pipeline is not None else run.base_model
    if model is None:
        raise ConfigError("run.base_model=None is not valid for generation; expected a model or a pipeline")
    result = generate_private_set(
        model, config, default_out_dir(run), overwrite=bool(options.get("overwrite", False)),
        progress=bool(options.get("progress", True)),
    )
    run.state["private_set"] = result
    return result


__all__ = [
    "GeneratedImage",
    "GeneratedSet",
    "GenerationConfig",
    "QualityError",
    "REFERENCE_NEGATIVE_PROMPT",
    "REFERENCE_QUALITY_SUFFIX",
    "REFERENCE_TEMPLATES",
    "SCHEDULERS",
    "batch_grid",
    "choose_template",
    "config_from_run",
    "default_out_dir",
    "generate_batch",
    "generate_private_set",
    "image_seed",
    "load_generated_set",
    "make_scheduler",
    "model_hash",
    "partition_batches",
    "s2l_generate_private_set",
    "slugify",
]
