"""inspect-memory engine: pictures, provenance, summary and page of a checkpoint's Semantic Memory.

The checkpoint comes from a tiny "training run" built here without the training loop: a few
`forward_train` calls of a MiT-B0 AllSpark model on real tiny JPEGs of an unlabeled split, then
`save_checkpoint` with settings that point at the dataset manifest.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from allspark_cli.data.imageio import read_image
from allspark_cli.data.manifest import DatasetManifest, TrainSplit, write_manifest
from allspark_cli.data.splits import SplitEntry, read_split, write_split
from allspark_cli.data.transforms import normalize
from allspark_cli.engine.inspection.inspect_memory import inspect_memory
from allspark_cli.engine.inspection.memory_pictures import token_grid
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.model.allspark import MemoryStep
from allspark_cli.model.checkpoint import read_checkpoint, save_checkpoint
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop

CROP = 64
CLASSES = ["background", "cat", "dog", "person"]
PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
NUM_UNLABELED = 6
BATCH_U = 2
ITERATIONS = 3
REFERENCE_CKPT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "reference_ckpt_b0.pth"


def _smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A 64x64 RGB uint8 picture with structure (blurred blobs), so features vary across tokens."""
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (CROP, CROP), interpolation=cv2.INTER_CUBIC)


def make_dataset(root: Path) -> Path:
    """A dataset folder with JPEGs, a labeled and an unlabeled split, and dataset.yaml; returns the yaml."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    names = [f"img_{i:02d}" for i in range(NUM_UNLABELED + 2)]
    for name in names:
        cv2.imwrite(str(root / "images" / f"{name}.jpg"), _smooth_image(rng)[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{name}.png"), rng.integers(0, len(CLASSES), (CROP, CROP), dtype=np.uint8))
    write_split(root / "labeled.txt", [SplitEntry(f"images/{n}.jpg", f"masks/{n}.png") for n in names[:2]])
    write_split(root / "unlabeled.txt", [SplitEntry(f"images/{n}.jpg", None) for n in names[2:]])
    write_split(root / "val.txt", [SplitEntry(f"images/{n}.jpg", f"masks/{n}.png") for n in names[:2]])
    manifest = DatasetManifest(
        name="tiny", root=root, classes=CLASSES, palette=PALETTE,
        train_splits={"1/4": TrainSplit(labeled="labeled.txt", unlabeled="unlabeled.txt")},
        eval_splits={"val": "val.txt"}, train_crop=CROP,
    )
    write_manifest(manifest, root / "dataset.yaml")
    return root / "dataset.yaml"


def make_run(run_dir: Path, manifest: Path | None, *, method: str = "allspark", settings: dict | None = None) -> Path:
    """A run folder with weights/best.pt of a model whose memory was written by a few training forwards."""
    torch.manual_seed(0)
    config = ModelConfig(backbone="b0", method=method, num_classes=len(CLASSES), head_dim=32,
                         memory_tokens=tokens_for_crop(CROP))
    model = build_model(config)
    if manifest is not None:
        root = manifest.parent
        unlabeled = read_split(root / "unlabeled.txt")
        images_u_all = torch.stack([normalize(read_image(root / entry.image)) for entry in unlabeled])
        images_l = torch.stack([normalize(_smooth_image(np.random.default_rng(9)))] * BATCH_U)
        with torch.no_grad():
            for iteration in range(ITERATIONS):
                ids = torch.tensor([(iteration * BATCH_U + j) % NUM_UNLABELED for j in range(BATCH_U)])
                images_u = images_u_all[ids]
                model.eval()
                pseudo_logits_u = model(images_u)
                model.train()
                step = MemoryStep(pseudo_logits_u, use_memory=iteration > 0, sample_ids_u=ids, iteration=iteration)
                model.forward_train(images_l, images_u, memory_step=step)
    if settings is None:
        settings = {"data": {"manifest": str(manifest), "split": "1/4", "crop": CROP}, "preset": "tiny"}
    path = run_dir / "weights" / "best.pt"
    save_checkpoint(path, model, class_names=CLASSES, palette=[list(c) for c in PALETTE], settings=settings)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, dataset.yaml) shared by the tests of this module (building it costs a few seconds)."""
    base = tmp_path_factory.mktemp("tiny_run")
    manifest = make_dataset(base / "data")
    make_run(base / "run", manifest)
    return base / "run", manifest


def _assert_picture(path: Path) -> None:
    assert path.is_file(), path
    picture = cv2.imread(str(path))
    assert picture is not None and picture.size > 0, path
    assert picture.std() > 1.0, f"{path} is (nearly) constant"


def _links(page: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', page.read_text(encoding="utf-8"))


def test_pictures_summary_and_page(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "report"
    summary = inspect_memory(run_dir, out_dir=out, max_channels=12)
    assert summary.checkpoint.endswith("best.pt") and summary.token_grid == (2, 2)
    assert summary.provenance_available, summary.provenance_note
    for picture in summary.pictures:
        _assert_picture(out / picture)
    data = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in data["classes"]] == CLASSES
    slots = 256  # MiT-B0 stage 4 has C = 256 channels, S = 1 x C
    assert all(c["slots"] == slots for c in data["classes"])
    # Every channel of every unlabeled image went to exactly one class.
    assert sum(c["assigned_count"] for c in data["classes"]) == ITERATIONS * BATCH_U * slots
    assert all(0 <= c["filled_slots"] <= slots and c["provenance_rows"] == c["filled_slots"] for c in data["classes"])
    assert sum(c["filled_slots"] for c in data["classes"]) > 0
    # Links of the page are relative and resolve to the pictures written.
    links = _links(out / "index.html")
    assert links and not any(link.startswith(("/", "file:")) for link in links)
    assert all((out / link).is_file() for link in links)
    assert {f"memory/class_{k:03d}_{n}.png" for k, n in enumerate(CLASSES)} <= set(links)
    assert "fill_level.png" in links and "assigned_count.png" in links


def test_provenance_points_to_images_of_the_list(tiny_run, tmp_path):
    run_dir, manifest = tiny_run
    out = tmp_path / "report"
    inspect_memory(run_dir / "weights" / "best.pt", out_dir=out)
    entries = read_split(manifest.parent / "unlabeled.txt")
    memory = read_checkpoint(run_dir / "weights" / "best.pt").state_dict
    with open(out / "provenance.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == int((memory["allspark.memory.source_sample"] >= 0).sum())
    for row in rows:
        index = int(row["source_sample"])
        assert 0 <= index < len(entries)
        assert row["image"] == entries[index].image and (manifest.parent / row["image"]).is_file()
        assert 0 <= int(row["source_iteration"]) < ITERATIONS and 0 <= int(row["source_channel"]) < 256
        k, slot = int(row["class_id"]), int(row["slot"])
        assert int(memory["allspark.memory.source_sample"][k, slot]) == index


def test_images_before_after_and_attention(tiny_run, tmp_path):
    run_dir, manifest = tiny_run
    image = manifest.parent / "images" / "img_00.jpg"
    out = tmp_path / "report"
    summary = inspect_memory(run_dir, out_dir=out, images=[image], max_channels=8)
    (item,) = summary.images
    for picture in (item.features_picture, item.attention_picture, item.attention_bars_picture):
        _assert_picture(out / picture)
    # Softmax over all memory keys: the per-class masses of a query channel sum to 1.
    assert sum(item.class_mass) == pytest.approx(1.0, abs=1e-4)
    links = _links(out / "index.html")
    assert item.features_picture in links and all((out / link).is_file() for link in links)


def test_class_selection_and_unknown_class(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    summary = inspect_memory(run_dir, out_dir=tmp_path / "a", classes=["dog", "1"], max_channels=4)
    assert [c.name for c in summary.classes] == ["cat", "dog"]
    with pytest.raises(SettingsError, match="valid: background, cat, dog, person"):
        inspect_memory(run_dir, out_dir=tmp_path / "b", classes=["horse"])
    assert not (tmp_path / "b").exists()


def test_bad_inputs(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(DataError):
        inspect_memory(not_a_checkpoint, out_dir=tmp_path / "a")
    out_file = tmp_path / "file.txt"
    out_file.write_text("x")
    with pytest.raises(SettingsError, match="is a file"):
        inspect_memory(run_dir, out_dir=out_file)
    with pytest.raises(DataError, match="best.pt or weights/last.pt"):
        inspect_memory(tmp_path, out_dir=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_run_dir_falls_back_to_last_and_tolerates_missing_settings(tmp_path):
    run_dir = tmp_path / "run"
    best = make_run(run_dir, None, settings={})
    best.rename(best.with_name("last.pt"))
    summary = inspect_memory(run_dir, out_dir=tmp_path / "out", max_channels=4)
    assert summary.checkpoint.endswith("last.pt") and not summary.provenance_available
    assert all(c.filled_slots == 0 for c in summary.classes)  # never trained: every slot is noise
    page = (tmp_path / "out" / "index.html").read_text()
    assert "No provenance" in page and "data.manifest" in page


def test_blind_memory_method(tiny_run, tmp_path):
    """`cca+smem` enqueues without grouping: the K rings fill as one ring, in order."""
    _, manifest = tiny_run
    make_run(tmp_path / "run", manifest, method="cca+smem")
    summary = inspect_memory(tmp_path / "run", out_dir=tmp_path / "out", max_channels=4)
    assert summary.method == "cca+smem"
    written = ITERATIONS * BATCH_U * 256  # 1536 channels into 4 x 256 slots: the ring wrapped once
    assert sum(c.assigned_count for c in summary.classes) == written
    assert [c.filled_slots for c in summary.classes] == [256] * len(CLASSES)


@pytest.mark.parametrize(
    ("tokens", "crop", "grid"),
    [(9, None, (3, 3)), (9, 65, (3, 3)), (4, 64, (2, 2)), (289, 513, (17, 17)), (6, None, (2, 3)),
     (12, [64, 192], (2, 6)), (9, 513, (3, 3))],
)
def test_token_grid(tokens, crop, grid):
    assert token_grid(tokens, crop) == grid


@pytest.mark.skipif(not REFERENCE_CKPT.is_file(), reason="../shared/reference is not available")
def test_reference_checkpoint(tmp_path):
    out = tmp_path / "ref"
    summary = inspect_memory(REFERENCE_CKPT, out_dir=out, classes=["0", "15"], max_channels=6)
    assert summary.source == "reference" and summary.token_grid == (3, 3)
    assert not summary.provenance_available
    assert all(c.filled_slots is None and c.assigned_count is None for c in summary.classes)
    for picture in summary.pictures:
        _assert_picture(out / picture)
    page = (out / "index.html").read_text()
    assert "reference code records no provenance" in page
    assert all((out / link).is_file() for link in _links(out / "index.html"))
