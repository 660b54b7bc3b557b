"""Members / non-members input for the MIA engine, and the distribution-shift diagnostic.

Inputs (:func:`resolve_images`): a list of :class:`s2l_plugin.data.ImageRecord` (or anything with
``path`` and ``caption``, such as testbed Samples), or an image folder read with
:func:`s2l_plugin.data.list_image_folder` (captions from ``metadata.jsonl``, sidecar ``.txt``, else
the one ``caption`` given for all). :func:`from_testbed` takes a built testbed (or its folder) and
returns the sets plus the ``duplicated`` / ``non-duplicated`` member groups.

Stated behaviour on bad input:

- an empty or missing folder, an unreadable image, fewer than 2 images in a set: InputError
  naming the set and the file, before any model runs;
- images of another size than the model's: resized (shorter side to the resolution, bicubic)
  and center-cropped, by the same rule in both sets; a warning in the result says how many
  images of each set were, so a size difference between sets cannot pass unnoticed;
- a set with no caption at all (no metadata, no .txt, no ``caption``): encoded with the empty
  caption, with a warning (the attacks are meant to condition on each image's own caption).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s2l_plugin.data import ImageRecord, image_to_tensor, list_image_folder, open_image
from s2l_plugin.errors import InputError

#: Minimum images per set: an ROC needs two per class to mean anything.
MIN_PER_SET = 2
#: Permutation-test p-value below which the shift diagnostic warns.
SHIFT_P_VALUE = 0.01


def resolve_images(spec: Any, *, caption: str | None = None, what: str = "images") -> list[ImageRecord]:
    """``spec`` as a list of ImageRecords: a folder path, or a sequence of records / objects with ``path`` and ``caption``.

    ``caption`` fills in images that have none. Raises InputError when the set is empty, has
    fewer than :data:`MIN_PER_SET` images, or is of an unknown kind.
    """
    if spec is None:
        raise InputError(f"{what}: no images given; expected an image folder or a list of images")
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.is_dir() and not any(path.iterdir()):
            raise InputError(f"{what} folder {str(path)!r} is empty; expected images (with metadata.jsonl or .txt captions)")
        records = list_image_folder(path, caption=caption)
    else:
        records = []
        for item in spec:
            if isinstance(item, ImageRecord):
                rec = item
            elif hasattr(item, "path"):
                rec = ImageRecord(path=Path(item.path), caption=getattr(item, "caption", None))
            elif isinstance(item, (str, Path)):
                rec = ImageRecord(path=Path(item))
            else:
                raise InputError(f"{what}: {item!r} is not an image; expected ImageRecord, a path, or an object with .path")
            if rec.caption is None and caption is not None:
                rec = ImageRecord(path=rec.path, caption=caption)
            records.append(rec)
    if len(records) < MIN_PER_SET:
        raise InputError(f"{what}: {len(records)} image(s); expected at least {MIN_PER_SET} to compute an ROC")
    return records


def check_images(members: Sequence[ImageRecord], nonmembers: Sequence[ImageRecord], resolution: int) -> list[str]:
    """Open every image's header before any model runs; return the warnings the result should carry.

    Raises InputError naming the first unreadable file. Warns (returned strings) when images of
    either set will be resized, and when a set has no captions.
    """
    from PIL import Image, UnidentifiedImageError

    warnings: list[str] = []
    for what, records in (("members", members), ("non-members", nonmembers)):
        resized = 0
        sizes: dict[tuple[int, int], int] = {}
        for rec in records:
            try:
                with Image.open(rec.path) as im:
                    size = im.size
            except (UnidentifiedImageError, OSError) as exc:
                raise InputError(f"{what}: {str(rec.path)!r} is not a readable image ({exc})") from exc
            sizes[size] = sizes.get(size, 0) + 1
            resized += size != (resolution, resolution)
        if resized:
            common = ", ".join(f"{w}x{h} ({c})" for (w, h), c in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
            warnings.append(
                f"{resized} of {len(records)} {what} image(s) resized to {resolution}x{resolution} "
                f"(shorter side, bicubic, center crop; same rule for both sets); sizes seen: {common}"
            )
        if all(r.caption is None for r in records):
            warnings.append(f"{what}: no captions found; encoded with the empty caption (give metadata.jsonl, .txt, or caption=)")
    return warnings


def iter_record_batches(
    items: Sequence[tuple[tuple[int, int], ImageRecord]],
    batch_size: int,
    resolution: int,
    *,
    batches: Sequence[int] | None = None,
) -> Iterator[tuple[list[tuple[int, int]], Any, list[str | None]]]:
    """Stream ``(keys, images [B,3,R,R] in [-1,1], captions)`` for the selected batch indices.

    Batch ``b`` is ``items[b*batch_size:(b+1)*batch_size]``; only those images are read, one
    batch at a time (memory does not grow with ``len(items)``).
    """
    import torch

    n_batches = -(-len(items) // batch_size)
    for b in batches if batches is not None else range(n_batches):
        chunk = items[b * batch_size : (b + 1) * batch_size]
        tensors = []
        for _key, rec in chunk:
            tensors.append(image_to_tensor(open_image(rec.path), resolution))
        yield [tuple(k) for k, _ in chunk], torch.stack(tensors), [r.caption for _, r in chunk]


@dataclass
class MembershipSets:
    """Members, non-members and named member groups (indices into ``members``), ready for audit_membership."""

    members: list[ImageRecord]
    nonmembers: list[ImageRecord]
    member_groups: dict[str, list[int]] = field(default_factory=dict)


def from_testbed(testbed: Any, domain: Any = None) -> MembershipSets:
    """The testbed's members and non-members (of ``domain``, or all), with ``duplicated`` / ``non-duplicated`` groups.

    ``testbed`` is a :class:`s2l_plugin.testbed.Testbed` or the folder holding its manifest.json.
    Groups are omitted when the set has no duplicated member (or no non-duplicated one).
    """
    if isinstance(testbed, (str, Path)):
        from s2l_plugin.testbed import Testbed

        testbed = Testbed.load(testbed)
    members = testbed.members(domain)
    nonmembers = testbed.nonmembers(domain)
    dup = [i for i, s in enumerate(members) if s.copies > 1]
    nondup = [i for i, s in enumerate(members) if s.copies <= 1]
    groups = {"duplicated": dup, "non-duplicated": nondup} if dup and nondup else {}
    return MembershipSets(
        members=[ImageRecord(path=Path(s.path), caption=s.caption) for s in members],
        nonmembers=[ImageRecord(path=Path(s.path), caption=s.caption) for s in nonmembers],
        member_groups=groups,
    )


def latent_shift(member_features: np.ndarray, nonmember_features: np.ndarray, *, seed: int = 0, n_perm: int = 500) -> dict[str, Any]:
    """How different the two sets are in (pooled) VAE latent space, before any membership signal.

    Features are standardized per dimension (pooled std). Reported:

    - ``mean_distance``: ‖μ_members - μ_nonmembers‖ / sqrt(d) on standardized features;
    - ``frechet_diag``: Fréchet distance between diagonal Gaussians fitted to each set, per dimension;
    - ``null_mean_distance``: the median ``mean_distance`` over random relabellings of the same
      images (what sampling noise alone gives at these set sizes);
    - ``p_value``: permutation test of ``mean_distance`` (``n_perm`` relabellings, seeded);
    - ``classifier_auc``: the shift classifier's out-of-fold AUC on the same features
      (:func:`s2l_plugin.audit.shift.classifier_auc`), on the scale of an attack's AUC.

    A ``warning`` is set when ``p_value`` < :data:`SHIFT_P_VALUE`: the sets can be told apart
    from their latents alone, so a high MIA AUC may reflect distribution shift, not membership.
    The VAE is usually not fine-tuned, so membership itself barely moves these features.
    """
    from s2l_plugin.audit.shift import classifier_auc

    m = np.asarray(member_features, dtype=np.float64)
    n = np.asarray(nonmember_features, dtype=np.float64)
    if m.ndim != 2 or n.ndim != 2 or m.shape[1] != n.shape[1] or m.shape[1] == 0:
        return {"method": "vae-latent", "error": "no latent features"}
    x = np.concatenate([m, n])
    std = x.std(axis=0)
    std[std == 0] = 1.0
    z = (x - x.mean(axis=0)) / std
    d = z.shape[1]
    nm = m.shape[0]

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)) / np.sqrt(d))

    observed = dist(z[:nm], z[nm:])
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        perm = rng.permutation(z.shape[0])
        null[i] = dist(z[perm[:nm]], z[perm[nm:]])
    p_value = float((1 + np.count_nonzero(null >= observed)) / (n_perm + 1))
    zm, zn = z[:nm], z[nm:]
    frechet = float(np.mean((zm.mean(0) - zn.mean(0)) ** 2 + (zm.std(0) - zn.std(0)) ** 2))
    out: dict[str, Any] = {
        "method": "vae-latent",
        "dims": d,
        "mean_distance": observed,
        "null_mean_distance": float(np.median(null)),
        "frechet_diag": frechet,
        "p_value": p_value,
        "n_perm": n_perm,
        "classifier_auc": classifier_auc(m, n, seed=seed),
        "warning": None,
    }
    if p_value < SHIFT_P_VALUE:
        out["warning"] = (
            f"members and non-members differ in VAE latent space (mean distance {observed:.3f} vs "
            f"{float(np.median(null)):.3f} for random splits, permutation p={p_value:.3g}): a high AUC may "
            "reflect distribution shift rather than membership; use non-members from the members' distribution"
        )
    return out
