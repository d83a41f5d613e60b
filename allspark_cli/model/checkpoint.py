"""Checkpoints out and in, and `load_model` (DESIGN.md section 5).

This toolkit's format is a dict with only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`:

    {"format": "allspark-checkpoint", "format_version": 1,
     "model_config": ModelConfig as a dict, "model": state dict (memory buffers included),
     "class_names": [...], "palette": [[r, g, b], ...],
     "settings": resolved settings dict ({} when none), "settings_version": int (absent before it
     was stored: version 1), "train_state": dict or None}

The model config records the encoder family (`backbone_family`; absent in checkpoints written
before it was: mit). It is written atomically (temporary file + rename). Checkpoints of the
reference code load too: their architecture is inferred from the weights (the family's variant
from its encoder tensors, classes, module heads, head width, memory shape).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from allspark_cli.labels import default_class_names
from allspark_cli.errors import DataError, SettingsError
from allspark_cli.fileio import atomic_path
from allspark_cli.model.backbones import BACKBONES, LEGACY_FAMILY, BackboneFamilyName
from allspark_cli.model.config import ModelConfig, build_model
from allspark_cli.model.encoder import ENCODER_PREFIX
from allspark_cli.model.memory import NEVER_WRITTEN
from allspark_cli.model.methods import method_of_weights
from allspark_cli.model.segmentor import AllSparkSegmentor
from allspark_cli.model.weights import ours_from_reference, torch_load_safely
from allspark_cli.labels import voc_palette

FORMAT_NAME = "allspark-checkpoint"
FORMAT_VERSION = 1
# Reference checkpoints are SegFormer models: MiT encoders.
REFERENCE_FAMILY: BackboneFamilyName = "mit"
# Buffers this toolkit adds to the memory; reference checkpoints lack them (they start as "unknown").
PROVENANCE_BUFFERS = ("source_sample", "source_channel", "source_iteration", "assigned_count")


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, whatever wrote it."""

    path: Path
    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    palette: list[list[int]]
    settings: dict[str, Any] = field(default_factory=dict)
    settings_version: int = 1  # the layout of `settings` (engine/settings.py SETTINGS_VERSION)
    train_state: dict[str, Any] | None = None
    source: Literal["allspark", "reference"] = "allspark"

    @property
    def num_classes(self) -> int:
        return self.model_config.num_classes


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model  # DistributedDataParallel


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    class_names: list[str],
    palette: list | None = None,
    settings: dict[str, Any] | None = None,
    settings_version: int = 1,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically writes `model` (an AllSparkSegmentor built by build_model) and its context."""
    model = _unwrap(model)
    config: ModelConfig = model.config
    if len(class_names) != config.num_classes:
        raise SettingsError(f"{len(class_names)} class names given for a model of {config.num_classes} classes")
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_config": config.model_dump(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "palette": [list(map(int, c)) for c in (palette if palette is not None else voc_palette(config.num_classes))],
        "settings": settings or {},
        "settings_version": settings_version,
        "train_state": train_state,
    }
    save_torch_file(path, payload)
    return Path(path)


class _ErrorKeepingWriter:
    """A file wrapper for torch.save that remembers the OSError of a failed write: torch reports it
    as a RuntimeError about stream positions, without the cause (disk full, permission lost)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch_file(path: str | os.PathLike, payload: Any) -> None:
    """torch.save, atomically and durably: the previous file stays whole until the new one is on
    disk; a failed write raises WriteError naming `path` and the cause."""
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
        writer = _ErrorKeepingWriter(handle)
        try:
            torch.save(payload, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def infer_model_config(
    state_dict: dict[str, torch.Tensor], *, path: Path | str = "weights", family: BackboneFamilyName = LEGACY_FAMILY
) -> ModelConfig:
    """The architecture that a state dict in this toolkit's names was made with; `family` says which
    encoder family reads the `backbone.encoder.*` tensors."""

    def shape(name: str) -> torch.Size:
        if name not in state_dict:
            raise DataError(f"{path}: not a SegFormer/AllSpark checkpoint (no tensor {name})")
        return state_dict[name].shape

    encoder_family = BACKBONES[family]
    encoder_state = {k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    try:
        backbone = encoder_family.variant_of(encoder_state)
    except KeyError as missing:
        raise DataError(f"{path}: not a SegFormer/AllSpark checkpoint (no tensor {ENCODER_PREFIX}{missing.args[0]})") from None
    except ValueError as error:
        raise DataError(f"{path}: {error}") from None
    dims = encoder_family.dims(backbone)
    num_classes, head_dim = shape("head.linear_pred.weight")[:2]
    fields: dict[str, Any] = {"backbone": backbone, "num_classes": num_classes, "head_dim": head_dim}
    channel_attention = "allspark.labeled_attention.q.weight" in state_dict
    semantic_memory = "allspark.memory.bank" in state_dict
    if channel_attention:
        fields["attention_heads"] = shape("allspark.labeled_attention.q.weight")[0] // dims[-1]
    if semantic_memory:
        # A foreign file records the memory length S alone; the configuration counts it in groups of C.
        _, slots, tokens = shape("allspark.memory.bank")
        multiple, rest = divmod(slots, dims[-1])
        if rest or not multiple:
            raise DataError(f"{path}: a memory of {slots} channels per class is no multiple of the {dims[-1]} channels")
        fields.update(memory_multiple=multiple, memory_tokens=tokens)
    method = method_of_weights(channel_attention=channel_attention, semantic_memory=semantic_memory)
    if method is None:
        raise DataError(f"{path}: no method has such weights (AllSpark module: {channel_attention}, "
                        f"Semantic Memory: {semantic_memory})")
    return ModelConfig(**fields, method=method)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint of this toolkit or of the reference code (DataError if it is neither)."""
    path = Path(path)
    content = torch_load_safely(path)
    if not isinstance(content, dict):
        raise DataError(f"{path}: not a checkpoint (expected a dict, found {type(content).__name__})")
    if content.get("format") == FORMAT_NAME:
        if content.get("format_version", 0) > FORMAT_VERSION:
            raise DataError(f"{path}: checkpoint format {content['format_version']} is newer than this allspark")
        _check_family_known(path, content.get("model_config"))
        try:
            return Checkpoint(
                path=path,
                model_config=ModelConfig(**content["model_config"]),
                state_dict=content["model"],
                class_names=list(content["class_names"]),
                palette=[list(c) for c in content["palette"]],
                settings=content.get("settings") or {},
                settings_version=int(content.get("settings_version", 1)),
                train_state=content.get("train_state"),
            )
        except (KeyError, TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            detail = " ".join(str(error).split())[:200]
            raise DataError(f"{path}: a damaged allspark checkpoint ({type(error).__name__}: {detail})") from None
    weights = content.get("model", content.get("state_dict", content))
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise DataError(f"{path}: not a checkpoint of allspark or of the reference code (no state dict)")
    state_dict = ours_from_reference(weights)
    config = infer_model_config(state_dict, path=path, family=REFERENCE_FAMILY)
    return Checkpoint(
        path=path,
        model_config=config,
        state_dict=state_dict,
        class_names=default_class_names(config.num_classes),
        palette=voc_palette(config.num_classes).tolist(),
        source="reference",
    )


def _check_family_known(path: Path, model_config: object) -> None:
    """DataError naming the family when a checkpoint records an encoder family this allspark lacks."""
    family = model_config.get("backbone_family", LEGACY_FAMILY) if isinstance(model_config, dict) else LEGACY_FAMILY
    if family not in BACKBONES:
        raise DataError(f"{path}: its encoder family {family!r} is not one this allspark knows ({', '.join(BACKBONES)}); "
                        "it was written by a newer allspark")


def _with_default_provenance(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adds empty provenance buffers (never written, nothing assigned) where a checkpoint lacks them."""
    bank = state_dict.get("allspark.memory.bank")
    if bank is None:
        return state_dict
    K, S, _ = bank.shape
    defaults = {name: torch.full((K, S), NEVER_WRITTEN, dtype=torch.long) for name in PROVENANCE_BUFFERS[:3]}
    defaults["assigned_count"] = torch.zeros(K, dtype=torch.long)
    completed = dict(state_dict)
    for name, tensor in defaults.items():
        completed.setdefault(f"allspark.memory.{name}", tensor)
    return completed


def model_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> AllSparkSegmentor:
    """Builds the checkpoint's model and loads its weights strictly. Returns it in eval mode on `device`.

    The model is built on the meta device and takes the checkpoint's tensors as they are, so no time
    is spent on a random initialisation that would be overwritten (seconds for MiT-B5 on a CPU).
    """
    with torch.device("meta"):
        model = build_model(checkpoint.model_config)
    try:
        model.load_state_dict(_with_default_provenance(checkpoint.state_dict), strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise DataError(f"{checkpoint.path}: weights do not fit the architecture they describe ({detail})") from None
    return model.to(device).eval()


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Checkpoint, AllSparkSegmentor]:
    """The checkpoint's contents and its eval-mode model on `device`: the one way eval, predict,
    export and inspect-memory open a checkpoint. DataError (exit 3) naming the file when it is
    missing, not a checkpoint, damaged, or holds weights that do not fit their architecture."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    checkpoint = read_checkpoint(path)
    return checkpoint, model_from_checkpoint(checkpoint, device)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> AllSparkSegmentor:
    """An eval-mode segmentor from a checkpoint of this toolkit or of the reference code.

    `model(images)` takes (N, 3, H, W) ImageNet-normalised floats and returns logits (N, K, H, W).
    """
    return load_for_inference(path, device)[1]
