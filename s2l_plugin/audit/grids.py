"""PNG grids for extraction reports: each generation beside its matched reference, with distances."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from s2l_plugin.errors import InputError
from s2l_plugin.result import ExtractionMatch

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Each 16×16 testbed image is drawn this many times larger (nearest neighbour, so pixels stay sharp).
CELL = 96
CAPTION_HEIGHT = 30


def _to_pil(image: torch.Tensor, cell: int):
    from PIL import Image

    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB").resize((cell, cell), Image.NEAREST)


def save_grid(
    matches: Sequence[ExtractionMatch],
    generations: Mapping[str, torch.Tensor],
    references: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    cell: int = CELL,
) -> Path:
    """Write a PNG with one row per match: generation | matched reference | caption with distances.

    ``generations`` maps a prompt to its ``[n, 3, H, W]`` generations in [-1, 1] (indexed by
    ``match.generation_index``); ``references`` maps a reference id to its ``[3, H, W]`` image. A
    match without a reference shows an empty reference cell. The file is written atomically
    (temp file, then rename) and its path returned. InputError when ``matches`` is empty or names
    a prompt, generation or reference that is not given.
    """
    from PIL import Image, ImageDraw

    if not matches:
        raise InputError("save_grid got no matches; expected at least one generation to show")
    rows = []
    for m in matches:
        if m.prompt not in generations or not 0 <= m.generation_index < len(generations[m.prompt]):
            raise InputError(f"match for prompt {m.prompt!r} generation {m.generation_index} has no image in generations")
        if m.reference_id is not None and m.reference_id not in references:
            raise InputError(f"match names reference {m.reference_id!r}, which is not in references")
        rows.append(m)
    caption_w = 4 * cell
    width = 2 * cell + caption_w
    height = len(rows) * (cell + 4) + CAPTION_HEIGHT
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 8), "generation | nearest reference | distances (normalized l2 on [-1, 1])", fill="black")
    for r, m in enumerate(rows):
        y = CAPTION_HEIGHT + r * (cell + 4)
        canvas.paste(_to_pil(generations[m.prompt][m.generation_index], cell), (0, y))
        if m.reference_id is not None:
            canvas.paste(_to_pil(references[m.reference_id], cell), (cell, y))
        else:
            draw.rectangle((cell, y, 2 * cell - 1, y + cell - 1), outline="grey")
        lines = [
            f"{m.prompt!r} #{m.generation_index} seed {m.seed}",
            f"ref {m.reference_id}",
            f"l2 {m.distance_l2:.3f}  tiled {m.distance_tiled:.3f}"
            + (f"  emb {m.distance_embedding:.3f}" if m.distance_embedding is not None else ""),
            f"clique {m.clique_size}  {'EXTRACTED' if m.extracted else 'not extracted'}",
        ]
        for k, line in enumerate(lines):
            draw.text((2 * cell + 6, y + 6 + 16 * k), line, fill="darkred" if m.extracted and k == 3 else "black")
    from s2l_plugin._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
