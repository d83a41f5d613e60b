"""`export`: a checkpoint's inference graph as ONNX or TorchScript, checked against the checkpoint.

The graph is `AllSparkSegmentor.forward`: per-image AllSpark (no memory, no batch coupling),
(N, 3, H, W) ImageNet-normalised float32 images -> (N, K, H, W) logits, dynamic N, H and W. The
file carries its metadata (what the input must be, class names, palette): ONNX in `metadata_props`,
TorchScript as the extra file `metadata.json`. Before reporting success the export is run on two
inputs of different batch and size and compared with the checkpoint's own model; the file is
written atomically, so a failed export leaves no file behind.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from allspark_cli.constants import EXPORT_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD
from allspark_cli.errors import AllsparkError, EnvError
from allspark_cli.fileio import atomic_path
from allspark_cli.model.checkpoint import load_for_inference

ExportFormat = Literal["onnx", "torchscript"]
DEFAULT_OPSET = 17
SUFFIXES = EXPORT_SUFFIXES
TORCHSCRIPT_METADATA = "metadata.json"
# Two check inputs: (batch, height, width); different from each other and from the tracing input.
TRACE_INPUT = (1, 64, 64)
CHECK_INPUTS = ((1, 96, 128), (3, 80, 72))
CHECK_TOLERANCE = 1e-3  # max |logit difference| accepted (float32 rounding of reordered ops is ~1e-6)
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportCheckError(AllsparkError):
    """The exported graph does not reproduce the checkpoint's logits (a bug: please report it)."""

    exit_code = 1


@dataclass
class ExportReport:
    path: Path
    format: ExportFormat
    max_difference: float
    checked_shapes: list[tuple[int, int, int, int]]
    num_classes: int


def metadata(class_names: list[str], palette: list[list[int]], source: str) -> dict[str, str]:
    """What a consumer of the file needs to know, as string key/values."""
    return {
        "input": "images: float32 (N, 3, H, W), RGB in [0, 1] normalised with ImageNet mean/std",
        "output": "logits: float32 (N, K, H, W); argmax over K is the class map",
        "normalization_mean": json.dumps(list(IMAGENET_MEAN)),
        "normalization_std": json.dumps(list(IMAGENET_STD)),
        "class_names": json.dumps(class_names),
        "palette": json.dumps([list(map(int, colour)) for colour in palette]),
        "source_checkpoint_kind": source,
        "producer": "allspark export",
    }


def default_output(checkpoint: Path, fmt: ExportFormat) -> Path:
    """`best.pt` -> `best.onnx` / `best.torchscript.pt` beside the checkpoint."""
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, meta: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError:
        raise EnvError('ONNX export needs the onnx package: pip install "allspark[export]"') from None
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is legacy
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic}, opset_version=opset,
                          dynamo=False)
    graph = onnx.load(str(path))
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise EnvError('checking an ONNX export needs onnxruntime: pip install "allspark[export]"') from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():  # tracer warnings about shape arithmetic; the checks below decide
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (example,), check_trace=False)
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, still the portable format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta)})


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")(images)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: ExportFormat,
    *,
    out: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Exports the checkpoint (this toolkit's or the reference's) and checks the file's logits."""
    checkpoint = Path(checkpoint)
    loaded, model = load_for_inference(checkpoint, "cpu")
    path = Path(out) if out is not None else default_output(checkpoint, fmt)
    meta = metadata(loaded.class_names, loaded.palette, loaded.source)
    generator = torch.Generator().manual_seed(0)
    batch, height, width = TRACE_INPUT
    example = torch.randn(batch, 3, height, width, generator=generator)
    with atomic_path(path) as temporary:
        if fmt == "onnx":
            _export_onnx(model, example, temporary, opset, meta)
        else:
            _export_torchscript(model, example, temporary, meta)
        worst, shapes = 0.0, []
        for batch, height, width in CHECK_INPUTS:
            images = torch.randn(batch, 3, height, width, generator=generator)
            with torch.no_grad():
                expected = model(images)
            got = _run_onnx(temporary, images) if fmt == "onnx" else _run_torchscript(temporary, images)
            if got.shape != expected.shape:
                raise ExportCheckError(f"{path}: the exported graph gives logits {tuple(got.shape)} for input "
                                       f"{tuple(images.shape)}, the checkpoint {tuple(expected.shape)}")
            worst = max(worst, float((got - expected).abs().max()))
            shapes.append(tuple(images.shape))
        if worst > CHECK_TOLERANCE:
            raise ExportCheckError(f"{path}: the exported graph differs from {checkpoint} by {worst:.2e} in the logits "
                                   f"(tolerance {CHECK_TOLERANCE:g}); nothing was written")
    return ExportReport(path, fmt, worst, shapes, loaded.num_classes)
