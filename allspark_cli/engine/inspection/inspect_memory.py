"""`inspect-memory`: pictures, an index.html and a summary.json of what the Semantic Memory holds.

What is drawn (paper figures 5-7, DESIGN.md section 1):
- per class slot, the stored channels (N-vectors of the memory bank `(K, S, N)`) reshaped to the
  token grid of the training crop, as heat maps, each above the unlabeled image it came from;
- the fill level of every class (slots written since training started vs initial noise) and the
  number of channels the grouping sent to each class (`assigned_count`);
- for `images`: stage-4 channels before and after the AllSpark module (inference path, native
  size), and how much labeled-branch attention each query channel puts on each class slot of the
  memory (the training-time path; the image is resized to the training crop so that its token
  count matches the memory's).

This module opens the checkpoint, chooses the classes and writes the report; the pictures are
engine/inspection/memory_pictures.py's. Reference checkpoints carry no provenance and no fill information;
the page says so.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from allspark_cli.data.imageio import read_image
from allspark_cli.engine.inspection.memory_pictures import (
    ClassMemoryStats,
    ImageInspection,
    Progress,
    class_pictures,
    crop_size,
    image_pictures,
    resolve_provenance,
    token_grid,
    write_provenance_csv,
)
from allspark_cli.engine.inference.protocol import SavedRecipe
from allspark_cli.engine.training.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, WEIGHTS_DIR
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.fileio import atomic_write_text, write_png
from allspark_cli.model.backbones import family_of
from allspark_cli.model.checkpoint import Checkpoint, load_for_inference
from allspark_cli.model.config import tokens_for_crop
from allspark_cli.model.methods import METHODS
from allspark_cli.viz import memory as viz
from allspark_cli.viz.html import write_memory_report

# Channels drawn per class slot / per image unless the caller asks otherwise.
DEFAULT_MAX_CHANNELS = 32
# A run folder keeps its checkpoints here; best first, the last epoch otherwise.
RUN_CHECKPOINTS = (f"{WEIGHTS_DIR}/{BEST_CHECKPOINT}", f"{WEIGHTS_DIR}/{LAST_CHECKPOINT}")
# Images given with `images` are shrunk so that their long side is at most this (CPU time).
MAX_IMAGE_SIDE = 1024


@dataclass(frozen=True)
class InspectSummary:
    """What `inspect_memory` wrote; paths in `pictures` are relative to `out_dir`."""

    checkpoint: str
    source: str
    method: str
    backbone: str
    out_dir: str
    token_grid: tuple[int, int]
    slots_per_class: int
    provenance_available: bool
    provenance_note: str
    classes: list[ClassMemoryStats]
    images: list[ImageInspection]
    pictures: list[str]
    index_html: str
    summary_json: str


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or RUN_DIR -> RUN_DIR/weights/best.pt (else last.pt); DataError otherwise."""
    path = Path(path)
    if path.is_dir():
        for candidate in RUN_CHECKPOINTS:
            if (path / candidate).is_file():
                return path / candidate
        raise DataError(f"{path}: a run folder needs {' or '.join(RUN_CHECKPOINTS)}; neither exists")
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    return path


def default_out_dir(path: str | Path) -> Path:
    """RUN_DIR/inspect-memory for a run folder, else `<stem>-memory` beside the checkpoint."""
    path = Path(path)
    return path / "inspect-memory" if path.is_dir() else path.parent / f"{path.stem}-memory"


def _check_has_memory(info: Checkpoint) -> None:
    """SettingsError when the checkpoint's method has no Semantic Memory."""
    method = info.model_config.method
    if not METHODS[method].semantic_memory:
        with_memory = [name for name, spec in METHODS.items() if spec.semantic_memory]
        raise SettingsError(
            f"{info.path}: method '{method}' has no Semantic Memory; "
            f"inspect-memory needs one of {', '.join(with_memory)}"
        )


def _select_classes(names: Sequence[str], wanted: Sequence[str] | None) -> list[int]:
    if not wanted:
        return list(range(len(names)))
    chosen = []
    for item in wanted:
        if item in names:
            chosen.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            chosen.append(int(item))
        else:
            raise SettingsError(f"--classes: unknown class '{item}'; valid: {', '.join(names)}")
    return sorted(set(chosen))


def inspect_memory(
    checkpoint: str | Path,
    *,
    out_dir: str | Path,
    classes: Sequence[str] | None = None,
    max_channels: int = DEFAULT_MAX_CHANNELS,
    images: Sequence[str | Path] | None = None,
    image_root: str | Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> InspectSummary:
    """Writes the memory pictures, `index.html`, `summary.json` and `provenance.csv` to `out_dir`.

    checkpoint: a checkpoint file or a run folder (its weights/best.pt, else last.pt).
    classes: class names (or ids) to draw; all by default. max_channels: tiles per class slot
    and channels per image. images: extra images for the before/after and attention pictures.
    image_root: a dataset.yaml (or its folder) that replaces the manifest named in the checkpoint
    settings for resolving the source images. Raises DataError (not a checkpoint, unreadable
    image) or SettingsError (out_dir is a file, unknown class, method without memory).
    """
    report, out_dir = progress or (lambda message: None), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"--out: {out_dir} is a file, expected a folder")
    if max_channels < 1:
        raise SettingsError(f"--max-channels: expected at least 1, got {max_channels}")
    # Decoded before anything is written, so that a bad image leaves no partial report behind.
    inputs = [(Path(p), viz.limit_long_side(read_image(p, exif_orientation=True), MAX_IMAGE_SIDE)) for p in images or ()]
    path = resolve_checkpoint(checkpoint)
    report(f"reading {path}")
    info, model = load_for_inference(path, device)
    _check_has_memory(info)
    chosen = _select_classes(info.class_names, classes)
    memory = model.memory
    saved = SavedRecipe.from_settings(info.settings)
    # The memory's own (h, w); checkpoints written before it was stored: from the saved crop.
    backbone = info.model_config.backbone
    grid = info.model_config.memory_grid or token_grid(memory.tokens, saved.train_crop, backbone)
    provenance = resolve_provenance(saved, info.source, Path(image_root) if image_root else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, rows = class_pictures(memory, info, chosen, grid, max_channels, provenance, out_dir, report)
    charts = [] if info.source == "reference" else ["fill_level.png", "assigned_count.png"]
    if charts:
        names = [info.class_names[k] for k in chosen]
        write_png(out_dir / charts[0], viz.fill_level_chart([s.filled_slots for s in stats], memory.slots, names))
        write_png(out_dir / charts[1], viz.assigned_count_chart([s.assigned_count for s in stats], names))
    write_provenance_csv(out_dir / "provenance.csv", rows)
    # Attention on the memory needs the image's token count to be the memory's N.
    attention_size = crop_size(saved.train_crop)
    if attention_size is None or tokens_for_crop(attention_size, backbone) != memory.tokens:
        stride = family_of(backbone).feature_info(backbone)[-1].reduction  # g * stride pixels give g tokens a side
        attention_size = (grid[0] * stride, grid[1] * stride)
    inspections = []
    for index, (image_path, image) in enumerate(inputs):
        report(f"image {image_path}")
        inspections.append(image_pictures(model, image_path, image, index, info.class_names, chosen,
                                           max_channels, out_dir, device, attention_size))
    pictures = [s.picture for s in stats] + charts
    pictures += [p for i in inspections for p in (i.features_picture, i.attention_picture, i.attention_bars_picture)]
    summary = InspectSummary(
        checkpoint=str(path), source=info.source, method=info.model_config.method,
        backbone=backbone, out_dir=str(out_dir), token_grid=grid, slots_per_class=memory.slots,
        provenance_available=provenance.entries is not None, provenance_note=provenance.note, classes=stats,
        images=inspections, pictures=pictures, index_html="index.html", summary_json="summary.json",
    )
    atomic_write_text(out_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    write_memory_report(out_dir / "index.html", asdict(summary))
    return summary
