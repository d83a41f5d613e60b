"""The pictures of `inspect-memory` (engine/inspection/inspect_memory.py): one memory grid per class with the
source image of every slot, the provenance table, and per input image the features before/after
the AllSpark module and the attention each query channel puts on each class slot of the memory.

Provenance (`source_sample` -> image) is resolved through the checkpoint's training settings (its
dataset manifest and the unlabeled list of its split); reference checkpoints carry none.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

from allspark_cli.data.imageio import read_image
from allspark_cli.data.manifest import load_manifest
from allspark_cli.data.splits import SplitEntry, read_split
from allspark_cli.data.transforms import normalize
from allspark_cli.engine.inference.protocol import SavedRecipe
from allspark_cli.errors import DataError
from allspark_cli.fileio import atomic_write_text, write_png
from allspark_cli.model.checkpoint import Checkpoint
from allspark_cli.model.memory import NEVER_WRITTEN
from allspark_cli.model.backbones import DEFAULT_BACKBONE, Backbone
from allspark_cli.model.config import grid_for_crop
from allspark_cli.viz import memory as viz

STAGE4_INDEX = 3
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


class Provenance(NamedTuple):
    entries: list[SplitEntry] | None  # the run's unlabeled list, None when unknown
    root: Path | None
    note: str


def token_grid(tokens: int, crop: object = None, backbone: Backbone = DEFAULT_BACKBONE) -> tuple[int, int]:
    """(h, w) of the last stage's token grid: from the training crop (through the backbone's grid
    rule) when it fits `tokens`, else from N.

    `crop` is an int or an (h, w) pair. Without a usable crop, N is split into the most square
    factor pair h <= w (a square N -> sqrt(N) x sqrt(N); the reference's N = 9 -> 3 x 3).
    """
    size = crop_size(crop)
    if size is not None:
        grid = grid_for_crop(size, backbone)
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


def resolve_provenance(saved: SavedRecipe, source: str, manifest_override: Path | None) -> Provenance:
    if source == "reference":
        return Provenance(None, None, "reference checkpoint: the reference code records no provenance")
    manifest_path, split = manifest_override or saved.manifest, saved.split
    if not manifest_path or not split:
        return Provenance(None, None, "the checkpoint settings name no data.manifest / data.split: "
                           "source images cannot be shown (pass --data dataset.yaml if only the manifest is missing)")
    try:
        manifest = load_manifest(manifest_path)
        unlabeled = manifest.train_split(str(split)).unlabeled
        if unlabeled is None:
            return Provenance(None, None, f"training split '{split}' has no unlabeled list")
        entries = read_split(manifest.root / unlabeled)
    except DataError as error:
        if manifest_override is not None:  # asked for explicitly: a problem is the user's to fix
            raise
        return Provenance(None, None, f"provenance unavailable: {error}")
    note = f"source images from {manifest.root / unlabeled} ({len(entries)} images)"
    return Provenance(entries, manifest.root, note)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "x"


class _Thumbnails:
    """Source-image thumbnails by unlabeled index, read once each; None when unreadable."""

    def __init__(self, provenance: Provenance) -> None:
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


def class_pictures(
    memory, info: Checkpoint, classes: list[int], grid: tuple[int, int], max_channels: int,
    provenance: Provenance, out_dir: Path, progress: Progress,
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


def write_provenance_csv(path: Path, rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class_id", "class", "slot", "source_sample", "image", "source_iteration", "source_channel"])
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@torch.no_grad()
def image_pictures(model, path: Path, image: np.ndarray, index: int, names, classes, max_channels, out_dir, device,
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
