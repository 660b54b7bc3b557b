"""Training-data extraction audit (Carlini et al. 2023, "Extracting Training Data from Diffusion Models").

Generate-and-filter, then match:

1. **Generate** ``n_per_prompt`` images per prompt; image ``i`` of prompt ``p`` gets the recorded seed
   ``image_seed(seed, p, i)`` (the same derivation as :mod:`s2l_plugin.generate`) and its own CPU
   generator, so the set is the same for any batch size or process count. Batches are sharded
   over accelerate processes and gathered.
2. **Near-duplicate graph** per prompt: an edge joins two generations whose *tiled* ℓ2
   (:mod:`s2l_plugin.audit.distances`) is below ``clique_delta``. A generation in a clique (Carlini) or
   connected group of at least ``clique_k`` generations is a *memorized candidate*: the model keeps
   producing the same image from different noise.
3. **Match** (when reference images — the private / member set — are given): every generation, and
   so every candidate, gets its nearest reference by normalized ℓ2, by tiled ℓ2 and optionally by
   cosine distance between embeddings of a local image encoder. A generation is *extracted* when
   its ``match_metric`` distance is below ``delta``. The result counts unique reference images
   extracted per prompt and overall, and the extraction rate (extracted generations / generations).

Distances are on images in ``[-1, 1]``; see :mod:`s2l_plugin.audit.distances` for units. The
defaults of ``delta`` / ``clique_delta`` / ``tile`` were measured on the testbed at 16×16
(``benchmarks/extraction_calibration.py``; numbers in docs/extraction.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from s2l_plugin.config import check_choice, check_positive
from s2l_plugin.defaults import EXTRACTION_GUIDANCE_SCALE, EXTRACTION_NUM_INFERENCE_STEPS
from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.hooks import hookimpl
from s2l_plugin.result import ExtractionMatch, ExtractionResult

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: Extraction threshold on normalized ℓ2 ([-1, 1] pixels): a generation this close to a reference
#: is a copy of it. Calibrated on the testbed (docs/extraction.md).
DEFAULT_DELTA = 0.15
#: Edge threshold of the near-duplicate graph, on tiled ℓ2 (which is >= plain ℓ2, so it sits higher).
DEFAULT_CLIQUE_DELTA = 0.30
#: Tile side in pixels: 4 at 16×16 gives Carlini's 4×4 grid of tiles.
DEFAULT_TILE = 4
#: Smallest near-duplicate group that marks a memorized candidate (Carlini: 10 of 500 generations).
DEFAULT_CLIQUE_K = 3
#: Sampler settings: the one defaults table's (SD's 7.5 / 50). On the 16×16 testbed guidance 3.0 put
#: generations as close to the data as held-out images are (docs/extraction.md, "Calibration"); the
#: demo config and the calibration benchmark set it explicitly.
DEFAULT_GUIDANCE = EXTRACTION_GUIDANCE_SCALE
DEFAULT_STEPS = EXTRACTION_NUM_INFERENCE_STEPS
#: Above this many generations, ``matches`` keeps only the extracted ones (the JSON stays small).
MAX_ALL_MATCHES = 2048

GROUPINGS = ("clique", "component")
MATCH_METRICS = ("l2", "tiled", "embedding")


# -- inputs ---------------------------------------------------------------------------------------


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts is not None else []
    if not prompts:
        raise ConfigError("prompts=[] is not valid; expected at least one prompt")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"prompt {p!r} is not valid; expected a non-empty string")
    if len(set(prompts)) != len(prompts):
        raise ConfigError(f"prompts={prompts!r} repeat a prompt; expected distinct prompts (seeds derive from the prompt)")
    return prompts


def _check_n(n_per_prompt: Any) -> None:
    if isinstance(n_per_prompt, bool) or not isinstance(n_per_prompt, int) or n_per_prompt < 2:
        raise ConfigError(
            f"n_per_prompt={n_per_prompt!r} is not valid; expected an integer >= 2 (near-duplicates need two generations)"
        )


def _fit_channels_and_size(x: torch.Tensor, size: tuple[int, int], notes: list[str]) -> torch.Tensor:
    """Reference images as 3-channel ``size`` tensors; every change is recorded in ``notes``."""
    import torch

    c = x.shape[1]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
        notes.append("reference images have 1 channel; repeated to RGB")
    elif c == 4:
        x = x[:, :3]
        notes.append("reference images have 4 channels; alpha dropped")
    elif c != 3:
        raise InputError(f"reference images have {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if tuple(x.shape[-2:]) != tuple(size):
        notes.append(f"reference images are {x.shape[-2]}x{x.shape[-1]}; resized to the generations' {size[0]}x{size[1]}")
        x = torch.nn.functional.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(-1.0, 1.0)
    return x.float().contiguous()


class References(NamedTuple):
    """Reference images ready for matching: ``images [M, 3, H, W]`` in [-1, 1], their ``ids``, conversion ``notes``."""

    images: Any
    ids: list[str]
    notes: list[str]


def load_references(
    reference_images: Any, size: tuple[int, int], reference_ids: Sequence[str] | None = None
) -> References:
    """Reference images as ``([M, 3, H, W] in [-1, 1], ids, notes)``.

    ``reference_images`` is a tensor ``[M, C, H, W]`` with pixels in ``[-1, 1]``, an image folder
    (read recursively with :func:`s2l_plugin.data.list_image_folder`; ids are paths relative to it), a
    list of ``ImageRecord`` / paths, or a list of PIL images. Grey and RGBA images become RGB and other sizes are resized to ``size``; each
    such change is logged and returned in ``notes``. ``ids`` default to file names (or ``ref<i>``).
    """
    import torch
    from PIL import Image

    from s2l_plugin.data import ImageRecord, image_to_tensor, list_image_folder, open_image

    notes: list[str] = []
    default_ids: list[str]
    root: Path | None = None
    if isinstance(reference_images, (str, Path)):
        # Recursive: a members/<domain>/ tree or kohya <repeats>_<name>/ subfolders are one reference set.
        root = Path(reference_images)
        reference_images = list_image_folder(root, recursive=True)
    if isinstance(reference_images, torch.Tensor):
        x = reference_images
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4:
            raise InputError(f"reference_images has shape {tuple(x.shape)}; expected [M, C, H, W]")
        if x.numel() and (float(x.min()) < -1.0 - 1e-4 or float(x.max()) > 1.0 + 1e-4):
            raise InputError(
                f"reference_images has pixels in [{float(x.min()):.3g}, {float(x.max()):.3g}]; expected [-1, 1]"
            )
        default_ids = [f"ref{i}" for i in range(x.shape[0])]
    else:
        items = list(reference_images)
        tensors = []
        default_ids = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                item = ImageRecord(path=Path(item))
            if isinstance(item, ImageRecord):
                image = open_image(item.path)
                default_ids.append(item.path.relative_to(root).as_posix() if root is not None else item.path.name)
            elif hasattr(item, "convert") and hasattr(item, "size"):
                image = item.convert("RGB")
                default_ids.append(f"ref{i}")
            else:
                raise InputError(f"reference image {i} is a {type(item).__name__}; expected a path, ImageRecord or PIL image")
            if image.size != (size[1], size[0]):
                note = f"reference images are {image.size[0]}x{image.size[1]}; resized to the generations' {size[0]}x{size[1]}"
                if note not in notes:
                    notes.append(note)
                # A plain resize, no crop: the whole reference is what a copy would reproduce.
                image = image.resize((size[1], size[0]), Image.BICUBIC)
            tensors.append(image_to_tensor(image, size[0]))
        if not tensors:
            raise InputError("reference_images is empty; expected at least one reference image")
        x = torch.stack(tensors)
    if x.shape[0] == 0:
        raise InputError("reference_images is empty; expected at least one reference image")
    x = _fit_channels_and_size(x, size, notes)
    ids = list(reference_ids) if reference_ids is not None else default_ids
    if len(ids) != x.shape[0]:
        raise InputError(f"reference_ids has {len(ids)} ids for {x.shape[0]} reference images; expected one id per image")
    for note in notes:
        log.warning("extraction: %s", note)
    return References(x, [str(i) for i in ids], notes)


# -- optional embedding -------------------------------------------------------------------------


class ImageEncoder:
    """A local image encoder (a transformers vision model folder) giving L2-normalized embeddings.

    Loads with ``local_files_only=True``; any folder ``AutoModel`` reads and whose model exposes
    ``get_image_features`` (CLIPModel), ``image_embeds`` (CLIPVisionModelWithProjection) or a
    ``pooler_output`` works. Preprocessing: the folder's image processor when it has one, else a
    resize to ``config.image_size`` (pixels stay in [-1, 1], i.e. Normalize(0.5, 0.5) as SSCD uses).
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"encoder folder {str(folder)!r} does not exist; expected a local image-encoder folder")
        try:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for unusable folders
            raise InputError(
                f"encoder folder {str(folder)!r} could not be loaded as an image encoder ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); expected a transformers vision model saved with save_pretrained"
            ) from exc
        self.model.eval()
        if not (hasattr(self.model, "get_image_features") or "pixel_values" in self._forward_args()):
            raise InputError(
                f"encoder folder {str(folder)!r} holds a {type(self.model).__name__}, which takes no images; "
                "expected an image encoder (e.g. CLIPVisionModelWithProjection)"
            )
        self.processor = None
        try:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception:  # no processor saved: fall back to a plain resize (documented above)
            self.processor = None
        self.folder = folder

    def _forward_args(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.model.forward).parameters)

    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[N, 3, H, W]`` in [-1, 1] → ``[N, D]`` unit-norm embeddings (float32)."""
        import torch

        outs = []
        size = getattr(getattr(self.model, "config", None), "image_size", None)
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].float()
            if self.processor is not None:
                pixels = self.processor(images=list(((x + 1) / 2).clamp(0, 1)), do_rescale=False, return_tensors="pt")["pixel_values"]
            else:
                pixels = x
                if size is not None and tuple(x.shape[-2:]) != (size, size):
                    pixels = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            with torch.no_grad():
                if hasattr(self.model, "get_image_features"):
                    feats = self.model.get_image_features(pixel_values=pixels)
                    feats = getattr(feats, "pooler_output", feats)
                else:
                    out = self.model(pixel_values=pixels)
                    feats = getattr(out, "image_embeds", None)
                    if feats is None:
                        feats = out.pooler_output
            outs.append(torch.nn.functional.normalize(feats.float().reshape(feats.shape[0], -1), dim=-1))
        return torch.cat(outs)


def nearest_embedding(queries: torch.Tensor, references: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference by cosine distance ``1 − cos`` of unit-norm embeddings: ``(distance [n], index [n])``."""
    import torch

    dists, idxs = [], []
    for start in range(0, queries.shape[0], block):
        sim = queries[start : start + block] @ references.T
        val, idx = sim.max(1)
        dists.append(1.0 - val)
        idxs.append(idx)
    return torch.cat(dists).clamp_min(0.0), torch.cat(idxs)


# -- generation ---------------------------------------------------------------------------------


def generate_for_prompt(
    pipeline: Any,
    prompt: str,
    n: int,
    *,
    seed: int = 0,
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[torch.Tensor, list[int]]:
    """``n`` generations of ``prompt`` as ``([n, 3, H, W] float32 in [-1, 1], seeds)``.

    Image ``i`` uses ``image_seed(seed, prompt, i)`` and its own CPU generator; batches follow
    :func:`s2l_plugin.generate.batch_grid` and are split over accelerate processes, then gathered in
    index order, so the result does not depend on the process count.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from s2l_plugin._dist import check_joined, cpu_launch
    from s2l_plugin.generate import batch_grid, image_seed, partition_batches
    from s2l_plugin.progress import no_sampler_bar, progress_bar

    seeds = [image_seed(seed, prompt, i) for i in range(n)]
    # The size every stage audits at (a FluxPipeline's own default is not its VAE's sample size).
    side, _ = _output_size(pipeline)
    # A CPU-only multi-process launch must say cpu=True, or every process would generate all of it.
    state = PartialState(cpu=cpu_launch())
    check_joined(state.num_processes)
    num_proc, proc_idx = state.num_processes, state.process_index
    mine = partition_batches(batch_grid(0, n, batch_size), num_proc, proc_idx)
    done: list[tuple[int, Any]] = []
    bar = progress_bar(mine, desc=f"extraction: generating {prompt!r}", unit="batch", disable=not progress or proc_idx != 0, leave=False)
    with no_sampler_bar(pipeline):  # the bar above counts the batches
        for batch in bar:
            generators = [torch.Generator("cpu").manual_seed(seeds[i]) for i in batch]
            with torch.inference_mode():
                out = pipeline(
                    prompt=[prompt] * len(batch),
                    height=side,
                    width=side,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    output_type="pt",
                )
            images = (out.images.float().cpu() * 2.0 - 1.0).clamp(-1.0, 1.0)
            done.extend((i, images[k]) for k, i in enumerate(batch))
    gathered = gather_object(done) if num_proc > 1 else done
    ordered = sorted(gathered, key=lambda item: item[0])
    return torch.stack([img for _, img in ordered]), seeds


# -- near-duplicate groups ----------------------------------------------------------------------


def group_sizes(distances: torch.Tensor, threshold: float, grouping: str = "clique") -> list[int]:
    """For each generation, the size of the largest clique (or its connected group) under ``threshold``.

    ``distances`` is a symmetric ``[n, n]`` matrix; an edge joins ``i != j`` with distance < threshold.
    A generation with no edge has size 1.
    """
    import networkx as nx

    check_choice("grouping", grouping, GROUPINGS)
    n = distances.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    rows, cols = ((distances < threshold).triu(1)).nonzero(as_tuple=True)
    graph.add_edges_from(zip(rows.tolist(), cols.tolist(), strict=True))
    sizes = [1] * n
    if grouping == "component":
        for comp in nx.connected_components(graph):
            for node in comp:
                sizes[node] = len(comp)
    else:
        for clique in nx.find_cliques(graph):
            for node in clique:
                sizes[node] = max(sizes[node], len(clique))
    return sizes


# -- the audit ------------------------------------------------------------------------------------


def _check_thresholds(delta: Any, clique_delta: Any, clique_k: Any, grouping: str, match_metric: str, encoder_dir: Any) -> None:
    for name, value in (("delta", delta), ("clique_delta", clique_delta)):
        check_positive(name, value)
    check_positive("clique_k", clique_k, integer=True)
    check_choice("grouping", grouping, GROUPINGS)
    check_choice("match_metric", match_metric, MATCH_METRICS)
    if match_metric == "embedding" and encoder_dir is None:
        raise ConfigError("match_metric='embedding' needs encoder_dir=<folder>; expected a local image-encoder folder")


def extract(
    pipeline: Any,
    prompts: Sequence[str] | str,
    n_per_prompt: int,
    reference_images: Any = None,
    *,
    reference_ids: Sequence[str] | None = None,
    delta: float = DEFAULT_DELTA,
    clique_delta: float = DEFAULT_CLIQUE_DELTA,
    clique_k: int = DEFAULT_CLIQUE_K,
    tile: int = DEFAULT_TILE,
    grouping: str = "clique",
    match_metric: str = "l2",
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 64,
    encoder_dir: str | Path | None = None,
    grid_path: str | Path | None = None,
    progress: bool = True,
) -> ExtractionResult:
    """Generate ``n_per_prompt`` images per prompt, find memorized candidates, match them to references.

    Generation: :func:`generate_for_prompt` (recorded per-image seeds, ``guidance_scale``,
    ``num_inference_steps``, batches of ``batch_size``); everything after it is
    :func:`extract_from_generations`, whose docstring describes the result. Bad input (no prompts,
    ``n_per_prompt`` < 2, bad thresholds, unreadable or out-of-range reference images, an encoder
    folder that does not load) raises before anything is generated or written.
    """
    prompts = _check_prompts(prompts)
    _check_n(n_per_prompt)
    _check_thresholds(delta, clique_delta, clique_k, grouping, match_metric, encoder_dir)
    check_positive("guidance_scale", guidance_scale, allow_zero=True)
    check_positive("num_inference_steps", num_inference_steps, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("seed", seed, integer=True, allow_zero=True)
    if reference_images is None and (reference_ids is not None or grid_path is not None):
        raise ConfigError("reference_ids / grid_path need reference_images; expected reference images too")
    size = _output_size(pipeline)
    from s2l_plugin.audit.distances import _check_tile

    _check_tile(tile, *size)
    # Everything that can fail on input is checked before the (long) generation.
    encoder = ImageEncoder(encoder_dir) if encoder_dir is not None else None
    refs = None
    if reference_images is not None:
        refs = load_references(reference_images, size, reference_ids)

    generations: dict[str, torch.Tensor] = {}
    seeds: dict[str, list[int]] = {}
    for prompt in prompts:
        generations[prompt], seeds[prompt] = generate_for_prompt(
            pipeline, prompt, n_per_prompt, seed=seed, guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps, batch_size=batch_size, progress=progress,
        )
    result = extract_from_generations(
        generations, seeds, refs, delta=delta, clique_delta=clique_delta, clique_k=clique_k, tile=tile,
        grouping=grouping, match_metric=match_metric, encoder=encoder, grid_path=grid_path, progress=progress,
    )
    result.base_seed = seed
    result.params.update(
        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, batch_size=batch_size,
        encoder_dir=str(encoder_dir) if encoder_dir is not None else None,
    )
    return result


def extract_from_generations(
    generations: Mapping[str, torch.Tensor],
    seeds: Mapping[str, Sequence[int]],
    references: Any = None,
    *,
    reference_ids: Sequence[str] | None = None,
    delta: float = DEFAULT_DELTA,
    clique_delta: float = DEFAULT_CLIQUE_DELTA,
    clique_k: int = DEFAULT_CLIQUE_K,
    tile: int = DEFAULT_TILE,
    grouping: str = "clique",
    match_metric: str = "l2",
    encoder: ImageEncoder | str | Path | None = None,
    grid_path: str | Path | None = None,
    progress: bool = False,
) -> ExtractionResult:
    """The filter-and-match half of :func:`extract`, on generations already made.

    ``generations`` maps each prompt to ``[n, 3, H, W]`` images in [-1, 1] (the same ``n`` for every
    prompt, n >= 2) and ``seeds`` maps it to their recorded seeds. ``references`` is anything
    :func:`load_references` reads, or the :class:`References` it returns. Returns an
    :class:`ExtractionResult` (``base_seed`` -1: the seeds are in the matches):

    - ``candidates``: every generation in a near-duplicate group (``grouping`` "clique" or
      "component", tiled ℓ2 < ``clique_delta``) of at least ``clique_k`` generations. With references,
      its fields are its nearest-reference match; without, ``reference_id`` is None and the distances
      are to its nearest other generation of the same prompt.
    - ``matches``: the nearest reference of every generation (all of them up to
      :data:`MAX_ALL_MATCHES` generations, else only the extracted ones). ``distance_l2`` /
      ``distance_tiled`` / ``distance_embedding`` are each that metric's nearest-reference distance;
      ``reference_id`` is the nearest under ``match_metric``; ``extracted`` = that distance < ``delta``.
    - ``extracted_unique``: prompt → number of unique reference images extracted;
      ``extracted_total`` over all prompts; ``extraction_rate`` = extracted generations / generations.
      ``params["extracted_ids"]`` lists the extracted reference ids per prompt and
      ``params["candidate_extracted_unique"]`` counts those found among candidates only.
      Conversions of the reference images (size, channels) are listed in ``params["notes"]``.
    """
    import torch

    from s2l_plugin.audit.distances import nearest, pairwise_distances
    from s2l_plugin.progress import progress_bar

    prompts = _check_prompts(list(generations))
    _check_thresholds(delta, clique_delta, clique_k, grouping, match_metric, encoder)
    counts = {int(generations[p].shape[0]) for p in prompts}
    if len(counts) != 1:
        raise InputError(f"generations have {sorted(counts)} images per prompt; expected the same number for every prompt")
    n_per_prompt = counts.pop()
    _check_n(n_per_prompt)
    for p in prompts:
        if len(seeds.get(p, ())) != n_per_prompt:
            raise InputError(f"seeds for prompt {p!r} do not match its {n_per_prompt} generations; expected one seed per image")
    size = tuple(generations[prompts[0]].shape[-2:])
    if isinstance(encoder, (str, Path)):
        encoder = ImageEncoder(encoder)
    refs, ref_ids, notes = None, [], []
    if references is not None:
        if isinstance(references, References):
            refs, ref_ids, notes = references
        else:
            refs, ref_ids, notes = load_references(references, size, reference_ids)

    sizes: dict[str, list[int]] = {}
    self_nn: dict[str, tuple[list[float], list[float]]] = {}
    for prompt in prompts:
        images = generations[prompt]
        tiled = pairwise_distances(images, metric="tiled", tile=tile)
        sizes[prompt] = group_sizes(tiled, clique_delta, grouping)
        if refs is None:
            plain = pairwise_distances(images)
            diag = torch.eye(n_per_prompt, dtype=torch.bool)
            self_nn[prompt] = (plain.masked_fill(diag, math.inf).min(1).values.tolist(),
                               tiled.masked_fill(diag, math.inf).min(1).values.tolist())

    all_images = torch.cat([generations[p] for p in prompts]).float()
    n_total = all_images.shape[0]
    matches_all: list[ExtractionMatch] = []
    if refs is not None:
        # One bar for the nearest-reference searches (theirs, nested in it, are not shown).
        with progress_bar(total=2 + (encoder is not None), desc="extraction: matching", unit="search",
                          disable=not progress, leave=False) as bar:
            d_l2, i_l2 = nearest(all_images, refs, metric="l2", progress=progress)
            bar.update(1)
            d_tiled, i_tiled = nearest(all_images, refs, metric="tiled", tile=tile, progress=progress)
            bar.update(1)
            d_emb = i_emb = None
            if encoder is not None:
                d_emb, i_emb = nearest_embedding(encoder.embed(all_images), encoder.embed(refs))
                bar.update(1)
        decide = {"l2": (d_l2, i_l2), "tiled": (d_tiled, i_tiled), "embedding": (d_emb, i_emb)}[match_metric]
        for k in range(n_total):
            p = prompts[k // n_per_prompt]
            i = k % n_per_prompt
            dist, idx = float(decide[0][k]), int(decide[1][k])
            matches_all.append(
                ExtractionMatch(
                    prompt=p, generation_index=i, seed=int(seeds[p][i]), reference_id=ref_ids[idx],
                    distance_l2=float(d_l2[k]), distance_tiled=float(d_tiled[k]), extracted=dist < delta,
                    clique_size=sizes[p][i], distance_embedding=None if d_emb is None else float(d_emb[k]),
                )
            )
        candidates = [m for m in matches_all if m.clique_size >= clique_k]
    else:
        candidates = [
            ExtractionMatch(
                prompt=p, generation_index=i, seed=int(seeds[p][i]), reference_id=None,
                distance_l2=self_nn[p][0][i], distance_tiled=self_nn[p][1][i], extracted=False, clique_size=sizes[p][i],
            )
            for p in prompts for i in range(n_per_prompt) if sizes[p][i] >= clique_k
        ]

    extracted = [m for m in matches_all if m.extracted]
    extracted_ids = {p: sorted({m.reference_id for m in extracted if m.prompt == p}) for p in prompts}
    candidate_unique = {p: len({m.reference_id for m in candidates if m.extracted and m.prompt == p}) for p in prompts}
    kept = matches_all if n_total <= MAX_ALL_MATCHES else extracted
    result = ExtractionResult(
        prompts=prompts,
        n_per_prompt=n_per_prompt,
        n_generations=n_total,
        delta=delta,
        tile=tile,
        clique_k=clique_k,
        base_seed=-1,
        candidates=candidates,
        matches=kept,
        extracted_unique={p: len(ids) for p, ids in extracted_ids.items()},
        extracted_total=len({m.reference_id for m in extracted}),
        extraction_rate=len(extracted) / n_total,
        n_references=0 if refs is None else int(refs.shape[0]),
        params={
            "clique_delta": clique_delta,
            "grouping": grouping,
            "match_metric": match_metric,
            "distance_units": "normalized l2 on [-1, 1] pixels; embedding: 1 - cosine",
            "matches_kept": "all" if kept is matches_all else "extracted",
            "extracted_ids": extracted_ids,
            "candidate_extracted_unique": candidate_unique,
            "notes": list(notes),
        },
    )
    if grid_path is not None:
        if refs is None:
            raise ConfigError("grid_path needs reference images; expected references too")
        from s2l_plugin.audit.grids import save_grid

        shown = extracted or sorted(matches_all, key=lambda m: _metric_of(m, match_metric))[:16]
        path = save_grid(shown, generations, dict(zip(ref_ids, refs, strict=True)), grid_path)
        result.grid_png = path.name
    return result


def _metric_of(match: ExtractionMatch, metric: str) -> float:
    value = {"l2": match.distance_l2, "tiled": match.distance_tiled, "embedding": match.distance_embedding}[metric]
    return math.inf if value is None else value


def _output_size(pipeline: Any) -> tuple[int, int]:
    """(height, width) of the pipeline's default generations."""
    from s2l_plugin.conditioning import default_resolution

    try:
        side = default_resolution(pipeline)
    except (AttributeError, TypeError):
        raise InputError(f"{type(pipeline).__name__} is not a text-to-image diffusers pipeline; expected a StableDiffusionPipeline") from None
    return side, side


# -- the registered extractor -------------------------------------------------------------------


class CarliniExtractor:
    """Carlini et al. generate-and-filter extraction with tiled-ℓ2 near-duplicate groups (:func:`extract`)."""

    name = "carlini"

    def extract(
        self,
        pipeline: Any,
        prompts: Sequence[str] | str,
        n: int,
        references: Any = None,
        **options: Any,
    ) -> ExtractionResult:
        """:func:`extract` with ``n`` generations per prompt and ``references`` as the reference images."""
        return extract(pipeline, prompts, n, references, **options)


@hookimpl
def register_extractors(register: Any) -> None:
    register(CarliniExtractor())


__all__ = [
    "CarliniExtractor",
    "ImageEncoder",
    "References",
    "extract",
    "extract_from_generations",
    "generate_for_prompt",
    "group_sizes",
    "load_references",
    "nearest_embedding",
]
