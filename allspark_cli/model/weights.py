"""Weights in: pretrained encoder weights and checkpoints of the reference code, always loaded safely.

- Pretrained encoder weights load through the backbone seam (model/encoder.py): the encoder's family
  maps the publisher's file onto the encoder (`encoder_state_dict`), and `load_pretrained_backbone`
  matches, reports and refuses the same way for every family.
- MiT ImageNet weights come in the SegFormer release naming (`mit_b0.pth` .. `mit_b5.pth`:
  `patch_embed1.*`, `block1.0.*`, `norm1.*` and an ImageNet `head.*` that we drop) or the
  Hugging Face `nvidia/mit-b*` naming (`model.safetensors`: `segformer.encoder.block.0.0.*`, with
  separate key/value projections). Both are mapped to the SegFormer naming, then onto timm's
  PVTv2 names with timm's own pvt_v2 checkpoint filter (the MiT family's remap, model/mit.py).
- Reference checkpoints (`{'model': DDP state dict with 'module.' prefix, ...}`) map module by
  module onto ours (`REFERENCE_PREFIXES`).

Every `.pth` is read with `torch.load(weights_only=True)`; only the numpy scalar types that the
reference's `previous_best` needs are allow-listed. Nothing is ever downloaded.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn
from torch import nn

from allspark_cli.constants import EXPORT_SUFFIXES
from allspark_cli.errors import DataError, SettingsError

# The reference stores `previous_best` as a numpy float64 scalar; unpickling it needs exactly these.
_NUMPY_SCALAR_GLOBALS = [np.dtype, type(np.dtype(np.float64))]
try:  # numpy >= 2 names the reconstructor numpy._core.multiarray.scalar
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar
_NUMPY_SCALAR_GLOBALS.append(_numpy_scalar)

# Reference module prefixes -> ours (after 'module.' is stripped). Order matters: first match wins.
REFERENCE_PREFIXES = (
    ("decoder.allspark.attn.kv_queue", "allspark.memory.bank"),
    ("decoder.allspark.attn.queue_ptr", "allspark.memory.pointer"),
    ("decoder.allspark.attn.q_u.", "allspark.unlabeled_attention.q."),
    ("decoder.allspark.attn.k_u.", "allspark.unlabeled_attention.k."),
    ("decoder.allspark.attn.v_u.", "allspark.unlabeled_attention.v."),
    ("decoder.allspark.attn.out_u.", "allspark.unlabeled_attention.out."),
    ("decoder.allspark.attn.q_l2u.", "allspark.labeled_attention.q."),
    ("decoder.allspark.attn.k_l2u.", "allspark.labeled_attention.k."),
    ("decoder.allspark.attn.v_l2u.", "allspark.labeled_attention.v."),
    ("decoder.allspark.attn.out_l2u.", "allspark.labeled_attention.out."),
    ("decoder.allspark.attn_norm.", "allspark.token_norm."),
    ("decoder.allspark.encoder_norm.", "allspark.output_norm."),
    ("decoder.allspark.map_in.", "allspark.map_in."),
    ("decoder.allspark.map_out.", "allspark.map_out."),
    ("decoder.decoder.", "head."),
)
# Hugging Face SegFormer encoder names -> SegFormer release names (regex, replacement).
_HF_RENAMES = (
    (r"^patch_embeddings\.(\d+)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^patch_embeddings\.(\d+)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^block\.(\d+)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (r"^layer_norm\.(\d+)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"\.layer_norm_1\.", lambda m: ".norm1."),
    (r"\.layer_norm_2\.", lambda m: ".norm2."),
    (r"\.attention\.self\.query\.", lambda m: ".attn.q."),
    (r"\.attention\.self\.sr\.", lambda m: ".attn.sr."),
    (r"\.attention\.self\.layer_norm\.", lambda m: ".attn.norm."),
    (r"\.attention\.output\.dense\.", lambda m: ".attn.proj."),
    (r"\.mlp\.dense1\.", lambda m: ".mlp.fc1."),
    (r"\.mlp\.dense2\.", lambda m: ".mlp.fc2."),
)
_IMAGENET_HEAD = re.compile(r"^(head|classifier)\.")


# The name of each kind of exported model and how to run it: the commands take checkpoints only.
_EXPORTED_RUNNERS = {"onnx": ("ONNX", "onnxruntime (onnxruntime.InferenceSession)"),
                     "torchscript": ("TorchScript", "torch.jit.load")}


def _exported_format(path: Path) -> str | None:
    """'onnx' / 'torchscript' when `path` is a model written by `allspark export` (by its suffix; a
    TorchScript archive also by its content: a zip holding compiled code), else None."""
    for fmt, suffix in EXPORT_SUFFIXES.items():
        if path.name.endswith(suffix):
            return fmt
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name for name in archive.namelist()):
                return "torchscript"
    return None


def _refuse_exported(path: Path) -> None:
    """SettingsError (exit 2: the wrong kind of file for the command) for an exported model."""
    fmt = _exported_format(path)
    if fmt is not None:
        kind, runner = _EXPORTED_RUNNERS[fmt]
        raise SettingsError(f"{path} is an exported {kind} model, not a checkpoint: run it with {runner} "
                            "(README, Export), or give this command the .pt checkpoint it was exported from")


def torch_load_safely(path: str | Path) -> object:
    """torch.load(weights_only=True) with only the numpy scalar types allow-listed; errors name the file
    (an exported model: SettingsError saying how to run it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    _refuse_exported(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reading failure is reported as unreadable data
        text = str(error)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsafe:
            raise DataError(
                f"{path}: refused: the file would run or build Python object {unsafe[1]}; "
                "only weight files and checkpoints are loaded"
            ) from None
        reason = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), type(error).__name__)
        if "Weights only load failed" in text:
            reason = "not a PyTorch weight file or checkpoint"
        raise DataError(f"{path}: not a readable PyTorch file ({reason[:160]})") from None


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .pth/.pt/.bin (torch) or .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise DataError(f"{path}: not a readable safetensors file ({error})") from None
    content = torch_load_safely(path)
    for key in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise SettingsError(f"{path}: expected a state dict of tensors")
    return content


def segformer_names_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `nvidia/mit-b*` names -> SegFormer release names (key and value fused into kv)."""
    out: dict[str, torch.Tensor] = {}
    pending_kv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        name = re.sub(r"^(segformer\.)?encoder\.", "", name)
        for pattern, replacement in _HF_RENAMES:
            name = re.sub(pattern, replacement, name)
        kv = re.match(r"^(.*)\.attention\.self\.(key|value)\.(weight|bias)$", name)
        if kv:
            pending_kv.setdefault(f"{kv[1]}.attn.kv.{kv[3]}", {})[kv[2]] = tensor
        else:
            out[name] = tensor
    for name, parts in pending_kv.items():
        if set(parts) != {"key", "value"}:
            raise SettingsError(f"weights have a key or a value projection without its pair at {name}")
        out[name] = torch.cat([parts["key"], parts["value"]], dim=0)  # rows [k; v], as MiT stores them
    return out


def timm_names_from_segformer(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegFormer release (or HF) MiT names -> timm PVTv2 names; the ImageNet classifier is dropped."""
    if any(k.startswith(("segformer.", "encoder.", "patch_embeddings.")) for k in state_dict):
        state_dict = segformer_names_from_hf(state_dict)
    kept = {k: v for k, v in state_dict.items() if not _IMAGENET_HEAD.match(k)}
    return checkpoint_filter_fn(kept, None)


def ours_from_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference-code state dict (possibly 'module.'-prefixed) in this toolkit's names."""
    stripped = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
    backbone = {k[len("backbone."):]: v for k, v in stripped.items() if k.startswith("backbone.")}
    out = {f"backbone.encoder.{k}": v for k, v in timm_names_from_segformer(backbone).items()}
    for name, tensor in stripped.items():
        if name.startswith("backbone."):
            continue
        for old, new in REFERENCE_PREFIXES:
            if name.startswith(old):
                out[new + name[len(old):]] = tensor
                break
        else:
            out[name] = tensor
    return out


@dataclass
class LoadReport:
    """What a weight load matched: counts for the user, names for the error message."""

    matched: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched

    def summary(self) -> str:
        return (
            f"{self.matched} tensors matched, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} of another shape"
        )


def match_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict, LoadReport]:
    """The entries of `state_dict` that fit `module` (same name and shape) and a report of the rest."""
    own = module.state_dict()
    report, usable, wrong_shape = LoadReport(), {}, set()
    for name, tensor in state_dict.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            wrong_shape.add(name)
            report.mismatched.append(f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
        else:
            usable[name] = tensor
    report.matched = len(usable)
    report.missing = [name for name in own if name not in usable and name not in wrong_shape]
    return usable, report


def load_pretrained_backbone(
    backbone: nn.Module, path: str | Path, *, allow_partial: bool = False
) -> LoadReport:
    """Loads a pretrained weight file in its publisher's layout into an encoder module (MiT: the
    SegFormer release or Hugging Face naming; DINOv2: Meta's release or timm's copy).

    Refuses (SettingsError, nothing loaded) unless every encoder tensor is matched, or
    `allow_partial` is set.
    """
    family, variant = backbone.family, backbone.variant
    name = family.display_name(variant)
    published = read_state_dict_file(path)
    try:
        state_dict = family.encoder_state_dict(published, backbone.encoder)
    except (RuntimeError, ValueError) as error:  # a publisher remap that meets tensors of other shapes
        raise SettingsError(f"{path}: does not fit {name} ({' '.join(str(error).split())[:160]})") from None
    usable, report = match_state_dict(backbone.encoder, state_dict)
    if not report.complete and not allow_partial:
        example = (report.mismatched or report.missing)[0]
        raise SettingsError(
            f"{path}: does not fit {name} ({report.summary()}; e.g. {example}); pass weights of the same "
            f"variant ({family.weight_file(variant)}), or allow a partial load explicitly"
        )
    backbone.encoder.load_state_dict(usable, strict=False)
    return report
