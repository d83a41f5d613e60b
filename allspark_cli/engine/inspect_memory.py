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

Provenance (`source_sample` -> image) is resolved through the checkpoint's training settings:
`settings["data"]["manifest"]` and `settings["data"]["split"]` (its unlabeled list). Reference
checkpoints carry no provenance and no fill information; the page says so.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from allspark_cli.data.imageio import read_image
from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import SplitEntry, read_split
from allspark_cli.data.transforms import normalize
from allspark_cli.engine.rundir import BEST_CHECKPOINT, LAST_CHECKPOINT, WEIGHTS_DIR
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.fileio import atomic_write_text, write_png
from allspark_cli.engine.protocol import SavedRecipe
from allspark_cli.model.checkpoint import Checkpoint, load_for_inference
from allspark_cli.model.memory import NEVER_WRITTEN
from allspark_cli.model.mit import stage_grid
from allspark_cli.model.segmentor import MEMORY_METHODS
from allspark_cli.viz import memory as viz
from allspark_cli.viz.html import write_memory_report

# Channels drawn per class slot / per image unless the caller asks otherwise.
DEFAULT_MAX_CHANNELS = 32
# A run folder keeps its checkpoints here; best first, the last epoch otherwise.
RUN_CHECKPOINTS = (f"{WEIGHTS_DIR}/{BEST_CHECKPOINT}", f"{WEIGHTS_DIR}/{LAST_CHECKPOINT}")
# Stage 4 of MiT has stride 32: an input of 32*g pixels gives g tokens per side.
STAGE4_STRIDE = 32
STAGE4_INDEX = 3
# Images given with `images` are shrunk so that their long side is at most this (CPU time).
MAX_IMAGE_SIDE = 1024
# Columns of the memory grids and of the before/after grids.
GRID_COLUMNS = 16
PAIR_COLUMNS = 8
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ClassMemoryStats:
    """One class slot: `filled_slots` / `assigned_count` are None when the checkpoint has no record."""

    class_id: int
    name: str
    slots: int
    filled_slots: int | None
    assigned_count: int | None
    provenance_rows: int
    resolved_images: int
    picture: str


@dataclass(frozen=True)
class ImageInspection:
    """Pictures of one `images` input; `class_mass` is its mean attention mass per class slot."""

    image: str
    features_picture: str
    attention_picture: str
    attention_bars_picture: str
    class_mass: list[float]


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


class _Provenance(NamedTuple):
    entries: list[SplitEntry] | None  # the run's unlabeled list, None when unknown
    root: Path | None
    note: str


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


def token_grid(tokens: int, crop: object = None) -> tuple[int, int]:
    """(h, w) of the stage-4 token grid: from the training crop when it fits `tokens`, else from N.

    `crop` is an int or an (h, w) pair. Without a usable crop, N is split into the most square
    factor pair h <= w (a square N -> sqrt(N) x sqrt(N); the reference's N = 9 -> 3 x 3).
    """
    size = crop_size(crop)
    if size is not None:
        grid = (stage_grid(size[0]), stage_grid(size[1]))
        if grid[0] * grid[1] == tokens:
            return grid
    side = math.isqrt(tokens)
    while tokens % side:
        side -= 1
    return side, tokens // side


def crop_size(crop: object) -> tuple[int, int] | None:
    """The training crop as (height, width) from a settings value (int or pair); None if unusable."""
    if isinstance(crop, int) and not isinstance(crop, bool):
        crop = (crop, crop)
    if isinstance(crop, (list, tuple)) and len(crop) == 2 and all(isinstance(c, int) and c > 0 for c in crop):
        return int(crop[0]), int(crop[1])
    return None


def _check_has_memory(info: Checkpoint) -> None:
    """SettingsError when the checkpoint's method has no Semantic Memory."""
    method = info.model_config.method
    if method not in MEMORY_METHODS:
        raise SettingsError(
            f"{info.path}: method '{method}' has no Semantic Memory; "
            f"inspect-memory needs one of {', '.join(sorted(MEMORY_METHODS))}"
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


def _resolve_provenance(saved: SavedRecipe, source: str, manifest_override: Path | None) -> _Provenance:
    if source == "reference":
        return _Provenance(None, None, "reference checkpoint: the reference code records no provenance")
    manifest_path, split = manifest_override or saved.manifest, saved.split
    if not manifest_path or not split:
        return _Provenance(None, None, "the checkpoint settings name no data.manifest / data.split: "
                           "source images cannot be shown (pass --data dataset.yaml if only the manifest is missing)")
    try:
        manifest = load_manifest(manifest_path)
        unlabeled = manifest.train_split(str(split)).unlabeled
        if unlabeled is None:
            return _Provenance(None, None, f"training split '{split}' has no unlabeled list")
        entries = read_split(manifest.root / unlabeled)
    except DataError as error:
        if manifest_override is not None:  # asked for explicitly: a problem is the user's to fix
            raise
        return _Provenance(None, None, f"provenance unavailable: {error}")
    note = f"source images from {manifest.root / unlabeled} ({len(entries)} images)"
    return _Provenance(entries, manifest.root, note)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "x"


class _Thumbnails:
    """Source-image thumbnails by unlabeled index, read once each; None when unreadable."""

    def __init__(self, provenance: _Provenance) -> None:
        self.provenance, self.cache, self.failed = provenance, {}, 0

    def get(self, index: int) -> np.ndarray | None:
        entries = self.provenance.entries
        if entries is None or not 0 <= index < len(entries):
            return None
        if index not in self.cache:
            try:
                self.cache[index] = viz.thumbnail(read_image(self.provenance.root / entries[index].image))
            except DataError:
                self.failed += 1
                self.cache[index] = None
        return self.cache[index]


def _slot_order(written: np.ndarray, iterations: np.ndarray, limit: int) -> list[int]:
    """Written slots, most recent first, then noise slots in slot order; at most `limit`."""
    slots = np.arange(len(written))
    recent = sorted(slots[written], key=lambda s: (-int(iterations[s]), int(s)))
    return (recent + [int(s) for s in slots[~written]])[:limit]


def _slot_label(slot: int, written: bool, iteration: int, channel: int, has_record: bool) -> str:
    if not has_record:
        return f"slot {slot}"
    return f"s{slot} it{iteration} c{channel}" if written else f"s{slot} noise"


def _class_pictures(
    memory, info: Checkpoint, classes: list[int], grid: tuple[int, int], max_channels: int,
    provenance: _Provenance, out_dir: Path, progress: Progress,
) -> tuple[list[ClassMemoryStats], list[list]]:
    """One memory grid per class; returns the per-class stats and the provenance table rows."""
    bank = memory.bank.detach().float().cpu().numpy()  # (K, S, N)
    sample, channel, iteration = (memory.source_sample.cpu().numpy(), memory.source_channel.cpu().numpy(),
                                  memory.source_iteration.cpu().numpy())  # (K, S) each
    assigned = memory.assigned_count.cpu().numpy()  # (K,)
    has_record = info.source != "reference"  # reference checkpoints carry no provenance buffers
    entries = provenance.entries
    thumbs = _Thumbnails(provenance)
    stats, rows = [], []
    for k in classes:
        name = info.class_names[k]
        progress(f"class {k} ({name})")
        written = (sample[k] > NEVER_WRITTEN) | (iteration[k] > NEVER_WRITTEN)
        if has_record:
            order = _slot_order(written, iteration[k], max_channels)
        else:
            written[:] = False
            order = list(range(min(max_channels, memory.slots)))
        labels = [_slot_label(s, written[s], iteration[k, s], channel[k, s], has_record) for s in order]
        sources = [thumbs.get(int(sample[k, s])) for s in order] if entries is not None else None
        picture = f"memory/class_{k:03d}_{_safe(name)}.png"
        channels = bank[k, order].reshape(len(order), *grid)
        write_png(out_dir / picture, viz.memory_grid(channels, labels, sources, columns=GRID_COLUMNS))
        resolved = 0
        for slot in np.flatnonzero(written):
            index = int(sample[k, slot])
            in_list = entries is not None and 0 <= index < len(entries)
            resolved += in_list
            image = entries[index].image if in_list else ""
            rows.append([k, name, int(slot), index, image, int(iteration[k, slot]), int(channel[k, slot])])
        filled = int(written.sum())
        stats.append(ClassMemoryStats(
            class_id=k, name=name, slots=memory.slots, filled_slots=filled if has_record else None,
            assigned_count=int(assigned[k]) if has_record else None, provenance_rows=filled,
            resolved_images=resolved, picture=picture,
        ))
    if thumbs.failed:
        progress(f"warning: {thumbs.failed} source images could not be read (drawn grey)")
    return stats, rows


def _write_csv(path: Path, rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class_id", "class", "slot", "source_sample", "image", "source_iteration", "source_channel"])
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@torch.no_grad()
def _image_pictures(model, path: Path, image: np.ndarray, index: int, names, classes, max_channels, out_dir, device,
                    attention_size) -> ImageInspection:
    """Before/after grid at the image's size, and the attention on the memory at `attention_size` (h, w)."""
    stage4 = model.extract_features(normalize(image)[None].to(device))[STAGE4_INDEX]
    before, after = stage4[0].float().cpu().numpy(), model.allspark(stage4)[0].float().cpu().numpy()
    spread = before.reshape(before.shape[0], -1).std(axis=1)  # the most varied channels say most
    channel_ids = sorted(np.argsort(-spread, kind="stable")[:max_channels].tolist())
    stem = f"images/{index:02d}_{_safe(path.stem)}"
    pairs = viz.feature_pair_grid(image, before, after, channel_ids, columns=PAIR_COLUMNS)
    write_png(out_dir / f"{stem}_features.png", pairs)
    crop_image = cv2.resize(image, (attention_size[1], attention_size[0]), interpolation=cv2.INTER_LINEAR)
    crop_stage4 = model.extract_features(normalize(crop_image)[None].to(device))[STAGE4_INDEX]
    # (hC, K): attention mass of each query channel on each memory class slot; rows sum to 1.
    mass = model.allspark.memory_attention_by_class(crop_stage4)[0][:, classes].float().cpu().numpy()
    shown = [names[k] for k in classes]
    write_png(out_dir / f"{stem}_attention.png", viz.attention_class_map(mass, shown))
    class_mass = mass.mean(axis=0)
    write_png(out_dir / f"{stem}_attention_bars.png", viz.attention_class_bars(class_mass, shown))
    return ImageInspection(str(path), f"{stem}_features.png", f"{stem}_attention.png", f"{stem}_attention_bars.png",
                           [float(v) for v in class_mass])


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
    inputs = [(Path(p), viz.limit_long_side(read_image(p), MAX_IMAGE_SIDE)) for p in images or ()]
    path = resolve_checkpoint(checkpoint)
    report(f"reading {path}")
    info, model = load_for_inference(path, device)
    _check_has_memory(info)
    chosen = _select_classes(info.class_names, classes)
    memory = model.memory
    saved = SavedRecipe.from_settings(info.settings)
    grid = token_grid(memory.tokens, saved.train_crop)
    provenance = _resolve_provenance(saved, info.source, Path(image_root) if image_root else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, rows = _class_pictures(memory, info, chosen, grid, max_channels, provenance, out_dir, report)
    charts = [] if info.source == "reference" else ["fill_level.png", "assigned_count.png"]
    if charts:
        names = [info.class_names[k] for k in chosen]
        write_png(out_dir / charts[0], viz.fill_level_chart([s.filled_slots for s in stats], memory.slots, names))
        write_png(out_dir / charts[1], viz.assigned_count_chart([s.assigned_count for s in stats], names))
    _write_csv(out_dir / "provenance.csv", rows)
    # Attention on the memory needs the image's token count to be the memory's N.
    attention_size = crop_size(saved.train_crop)
    if attention_size is None or stage_grid(attention_size[0]) * stage_grid(attention_size[1]) != memory.tokens:
        attention_size = (grid[0] * STAGE4_STRIDE, grid[1] * STAGE4_STRIDE)
    inspections = []
    for index, (image_path, image) in enumerate(inputs):
        report(f"image {image_path}")
        inspections.append(_image_pictures(model, image_path, image, index, info.class_names, chosen,
                                           max_channels, out_dir, device, attention_size))
    pictures = [s.picture for s in stats] + charts
    pictures += [p for i in inspections for p in (i.features_picture, i.attention_picture, i.attention_bars_picture)]
    summary = InspectSummary(
        checkpoint=str(path), source=info.source, method=info.model_config.method,
        backbone=info.model_config.backbone, out_dir=str(out_dir), token_grid=grid, slots_per_class=memory.slots,
        provenance_available=provenance.entries is not None, provenance_note=provenance.note, classes=stats,
        images=inspections, pictures=pictures, index_html="index.html", summary_json="summary.json",
    )
    atomic_write_text(out_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    write_memory_report(out_dir / "index.html", asdict(summary))
    return summary
