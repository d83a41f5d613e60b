"""The GPU check: correctness on CUDA, one MiT-B5 training iteration measured, and the
commands end to end. One table on stdout, every figure in a JSON file.

    python benchmarks/gpu_check.py                        # CUDA, the paper's sizes (about 5-8 minutes)
    python benchmarks/gpu_check.py --device cpu --smoke   # tiny sizes, any machine (the test suite runs it)

1. Correctness: every labeled-branch attention path (eager, sdpa, frugal) against float64 in float32,
   float32 + TF32 and bf16 (values and gradients); the dropout mask of each path is the one its backward
   uses (gradcheck with the mask fixed by the seed); the eval logits of the shared reference checkpoint
   against `eval_b0.pt`, with TF32 off and on (what TF32 changes on the logits); OHEM and the confusion
   matrix under `torch.cuda.set_sync_debug_mode("error")` (no host sync).
2. One full training iteration (pseudo-label pass, forward, backward, optimizer step) of MiT-B5, crop
   513, 8 + 8 images in groups of 2 (the reference's 4 GPUs), memory read as keys/values: time and peak
   memory in fp32, fp32 + TF32 and bf16, with our module and with a naive one (the paper's formula in
   plain autograd, keys and values repeated per labeled image as the reference does), memory 1x and 4x
   C; and the module's own forward + backward, for its share of the iteration. The same fp32 step as
   1, 2 and 4 micro-steps of whole groups (gradient accumulation): time and `max_memory_allocated`,
   which say which cards can train the paper's 8 + 8 recipe.
3. `train` -> `eval` -> `predict` through the CLI on a tiny dataset, a 1-process torchrun `train`, and
   NCCL's all_reduce / all_gather in a 1-rank group (CUDA).
The targets of the issue are evaluated at the end (only meaningful on a GPU at full size).
Weights are random (no download); the figures are speed and memory, not accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the package, and the tiny dataset of the tests

from allspark_cli.engine.training.losses import OhemCrossEntropy, build_criterion  # noqa: E402
from allspark_cli.engine.inference.metrics import ConfusionMatrix  # noqa: E402
from allspark_cli.engine.precision import autocast_factory, configure_cuda_math  # noqa: E402
from allspark_cli.engine.training.accumulation import accumulated_step  # noqa: E402
from allspark_cli.engine.training.step import StepRecipe, TrainForward, train_step  # noqa: E402
from allspark_cli.model.allspark import AllSparkModule, ChannelCrossAttention, MemoryStep  # noqa: E402
from allspark_cli.model.attention_maps import normalized_attention_map  # noqa: E402
from allspark_cli.model.attention_paths import labeled_attention  # noqa: E402
from allspark_cli.model.config import ModelConfig, build_model, tokens_for_crop  # noqa: E402
from allspark_cli.model.mit import MIT_VARIANTS, stage_grid  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference"
PATHS = ("eager", "sdpa", "frugal")
PRECISIONS = ("fp32", "fp32+tf32", "bf16")
MEMORY_MULTIPLES = (1, 4)
MODULES = ("ours", "naive")
# Sizes: the paper's pascal setting, and a tiny one for --smoke.
FULL = {"backbone": "b5", "crop": 513, "batch": 8, "groups": 4, "head_dim": 768, "classes": 21, "repeats": 3,
        "attention": {"images": 2, "channels": 512, "tokens": 289, "sources": 21}}
SMOKE = {"backbone": "b0", "crop": 64, "batch": 2, "groups": 2, "head_dim": 32, "classes": 3, "repeats": 1,
         "attention": {"images": 2, "channels": 16, "tokens": 5, "sources": 3}}
HEADS = 2
ACCUMULATION_STEPS = (1, 2, 4)  # micro-steps of the paper's 4 groups (engine/training/accumulation.py)
EVAL_LOGITS_TOLERANCE = 1e-4  # reference README: what a faithful float32 implementation meets
TARGETS = {"module_share_max": 0.10, "bf16_speedup_min": 1.8, "ours_vs_naive_min": 1.3}
END_TO_END_TIMEOUT_S = 600


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def precision(name: str, device: torch.device):
    """fp32 (TF32 off), fp32+tf32, or bf16 autocast (TF32 off for what stays float32)."""
    configure_cuda_math(tf32=name == "fp32+tf32", cudnn_benchmark=device.type == "cuda")
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        configure_cuda_math(tf32=False, cudnn_benchmark=False)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------- 1. correctness


def check_paths(device: torch.device, sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Every path in every precision against float64 (eager path, float64): values and gradients."""
    B, C, N, M = sizes["images"], sizes["channels"], sizes["tokens"], sizes["sources"]
    generator = torch.Generator().manual_seed(0)
    base = [torch.randn(*shape, generator=generator, dtype=torch.float64)
            for shape in ((B, HEADS * C, N), (M, N, C), (HEADS * C, C), (HEADS * C, C))]
    base[2:] = [weight / math.sqrt(C) for weight in base[2:]]
    upstream = torch.randn(B, HEADS * C, N, generator=generator, dtype=torch.float64).to(device)
    inputs64 = [t.to(device).requires_grad_() for t in base]
    reference = labeled_attention(*inputs64, path="eager")
    grads64 = torch.autograd.grad(reference, inputs64, upstream)
    rows = []
    for name in PRECISIONS:
        for path in PATHS:
            inputs = [t.detach().float().requires_grad_() for t in inputs64]
            with precision(name, device):
                out = labeled_attention(*inputs, path=path)
                grads = torch.autograd.grad(out.float(), inputs, upstream.float())
            errors = [_relative_error(got, want) for got, want in zip((out, *grads), (reference, *grads64))]
            rows.append({"path": path, "precision": name, "value_error": errors[0], "gradient_error": max(errors[1:])})
    return rows


def check_dropout_masks(device: torch.device) -> dict[str, bool]:
    """gradcheck of each path with dropout 0.5, the mask fixed by seeding before every evaluation: the
    gradient is that of the forward's own mask (the frugal function redraws it in backward)."""
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, generator=generator, dtype=torch.float64).to(device).requires_grad_()
              for shape in ((2, 4, 3), (2, 3, 3), (4, 3), (4, 3))]
    weights = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64).to(device)
    results = {}
    for path in PATHS:
        def run(*tensors, path=path):
            torch.manual_seed(123)
            return (labeled_attention(*tensors, path=path, dropout_p=0.5) * weights).sum()

        results[path] = bool(torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, raise_exception=False))
    return results


def check_reference_logits(device: torch.device) -> dict[str, Any]:
    """Max |logits - reference| of the shared checkpoint per image, TF32 off and on."""
    from allspark_cli import load_model

    checkpoint, outputs = REFERENCE / "reference_ckpt_b0.pth", REFERENCE / "eval_b0.pt"
    if not (checkpoint.is_file() and outputs.is_file()):
        return {"skipped": f"{REFERENCE} not found"}
    expected = torch.load(outputs, weights_only=True)
    model = load_model(checkpoint, device)
    result = {}
    for name in ("fp32", "fp32+tf32"):
        with precision(name, device), torch.no_grad():
            logits = torch.cat([model(image[None].to(device)) for image in expected["x_sq"]])
        result[name] = float((logits.cpu() - expected["logits_sq_single"]).abs().max())
    result["fp32_within_tolerance"] = result["fp32"] <= EVAL_LOGITS_TOLERANCE
    return result


def check_no_sync(device: torch.device) -> dict[str, Any]:
    """OHEM and a confusion-matrix update with CUDA's sync debug mode set to raise."""
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    logits = torch.randn(2, 19, 64, 64, device=device, requires_grad=True)
    target = torch.randint(0, 19, (2, 64, 64), device=device)
    target[:, :4] = 255
    matrix = ConfusionMatrix(19)
    result = {}
    for name, work in (("ohem", lambda: OhemCrossEntropy(thresh=0.7, min_kept=1000)(logits, target).backward()),
                       ("confusion", lambda: matrix.update(target, logits.detach().argmax(1)))):
        torch.cuda.set_sync_debug_mode("error")
        try:
            work()
            result[name] = "no sync"
        except RuntimeError as error:
            result[name] = f"synced: {' '.join(str(error).split())[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result


# --------------------------------------------------------------------- 2. the training iteration


def _naive_forward(self: ChannelCrossAttention, tokens: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """The paper's formula in plain autograd with the keys/values repeated for every labeled image,
    as the reference computes it. tokens (B, N, C), sources (M, N, C) -> (B, N, C)."""
    B = tokens.shape[0]
    queries = self.q(tokens).transpose(1, 2)  # (B, hC, N)
    keys, values = (proj(sources).transpose(1, 2).flatten(0, 1)[None].repeat(B, 1, 1)
                    for proj in (self.k, self.v))  # (B, M * hC, N), one copy per image
    attention = normalized_attention_map(queries @ keys.transpose(1, 2))
    dropout_p = self.attention_dropout if self.training else 0.0
    attention = F.dropout(attention, dropout_p).to(values.dtype)
    return self.projection_dropout(self.out((attention @ values).transpose(1, 2)))


def _use_naive(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ChannelCrossAttention):
            module.forward = types.MethodType(_naive_forward, module)


def _measure(step, device: torch.device, repeats: int) -> dict[str, Any]:
    """Median seconds of `step()` after one warm-up call, and the peak memory of the last call."""
    try:
        step()
        times = []
        for _ in range(repeats):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"seconds": None, "peak_gib": None, "oom": True}
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "peak_gib": peak, "oom": False}


def _iteration_setup(device, sizes, memory_multiple: int):
    """The paper's iteration at `sizes`: model, its TrainForward, SGD, CE, and random 8 + 8 batches."""
    crop, batch = sizes["crop"], sizes["batch"]
    torch.manual_seed(0)
    config = ModelConfig(backbone=sizes["backbone"], num_classes=sizes["classes"], head_dim=sizes["head_dim"],
                         memory_multiple=memory_multiple, memory_tokens=tokens_for_crop(crop))
    model = build_model(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = build_criterion("ce", ohem_thresh=0.7, ohem_min_kept=1)
    images = torch.randn(2 * batch, 3, crop, crop, device=device)
    batch_l = (images[:batch], torch.randint(0, sizes["classes"], (batch, crop, crop), device=device))
    batch_u = (images[batch:], torch.zeros(batch, crop, crop, dtype=torch.uint8, device=device),
               torch.arange(batch, device=device))
    return model, TrainForward(model), optimizer, criterion, batch_l, batch_u


def measure_iteration(device, sizes, precision_name: str, module: str, memory_multiple: int) -> dict[str, Any]:
    model, runner, optimizer, criterion, batch_l, batch_u = _iteration_setup(device, sizes, memory_multiple)
    if module == "naive":
        _use_naive(model)
    amp = "bf16" if precision_name == "bf16" else "off"
    configure_cuda_math(tf32=precision_name == "fp32+tf32", cudnn_benchmark=device.type == "cuda")
    autocast = autocast_factory(amp, device)

    def step():
        losses = train_step(runner, model, batch_l, batch_u, criterion_l=criterion, use_memory=True, iteration=0,
                            gather=None, autocast=autocast, recipe=StepRecipe(groups=sizes["groups"]))
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        optimizer.step()

    result = _measure(step, device, sizes["repeats"])
    configure_cuda_math(tf32=False, cudnn_benchmark=False)
    del model, runner, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_accumulation(device, sizes, micro_steps: int) -> dict[str, Any]:
    """The paper's step (fp32, our module, memory 1x) as `micro_steps` micro-steps of whole groups
    (engine/training/accumulation.py): which cards can train the 8 + 8 recipe, and at what cost."""
    model, runner, optimizer, criterion, batch_l, batch_u = _iteration_setup(device, sizes, memory_multiple=1)
    autocast = autocast_factory("off", device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        accumulated_step(runner, model, batch_l, batch_u, micro_steps=micro_steps,
                         backward=lambda loss: loss.backward(), criterion_l=criterion, use_memory=True, iteration=0,
                         gather=None, autocast=autocast, recipe=StepRecipe(groups=sizes["groups"]))
        optimizer.step()

    result = _measure(step, device, sizes["repeats"])
    del model, runner, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_module(device, sizes, precision_name: str, memory_multiple: int) -> dict[str, Any]:
    """The AllSpark module alone at the iteration's stage-4 shapes: forward_train + backward."""
    dim = MIT_VARIANTS[sizes["backbone"]].dims[-1]
    grid = stage_grid(sizes["crop"])
    batch = sizes["batch"]
    torch.manual_seed(0)
    module = AllSparkModule(dim, sizes["classes"], HEADS, memory_multiple=memory_multiple,
                            memory_tokens=grid * grid).to(device)
    features = torch.randn(2 * batch, dim, grid, grid, device=device, requires_grad=True)
    logits = torch.randn(batch, sizes["classes"], grid, grid, device=device)

    def step():
        with precision(precision_name, device):
            out_l, out_u = module.forward_train(features[:batch], features[batch:],
                                                memory_step=MemoryStep(logits, use_memory=True))
            (out_l.float().sum() + out_u.float().sum()).backward()

    return _measure(step, device, sizes["repeats"])


# ----------------------------------------------------------------------------- 3. end to end


def _cli(arguments: list[str]) -> dict[str, Any]:
    """One `allspark` command in this process (typer's runner: the CLI's code, without a new interpreter)."""
    from typer.testing import CliRunner

    from allspark_cli.cli.app import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, arguments)
    return {"ok": result.exit_code == 0, "seconds": round(time.perf_counter() - start, 1),
            **({} if result.exit_code == 0 else {"exit": result.exit_code,
                                                 "tail": " ".join(result.output.split())[-300:]})}


def _launch(command: list[str], cwd: Path) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=END_TO_END_TIMEOUT_S)
    return {"ok": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
            **({} if done.returncode == 0 else {"exit": done.returncode,
                                                "tail": " ".join((done.stderr or done.stdout).split())[-300:]})}


def end_to_end(device: torch.device) -> dict[str, Any]:
    """train -> eval -> predict through the CLI, then a 1-process torchrun train (its own processes)."""
    from train_fixtures import make_dataset, tiny_layer

    with tempfile.TemporaryDirectory(prefix="allspark-gpu-check-") as folder:
        work = Path(folder)
        manifest = make_dataset(work / "data")
        layer = tiny_layer(manifest, work / "runs", train={"device": device.type, "epochs": 1})
        config = work / "tiny.yaml"
        config.write_text(yaml.safe_dump(layer))
        checkpoint = work / "runs" / "tiny" / "e2e" / "weights" / "best.pt"
        chain = {
            "train": ["train", "--config", str(config), "--name", "e2e"],
            "eval": ["eval", str(checkpoint), "--device", device.type, "--workers", "0", "--out", str(work / "eval")],
            "predict": ["predict", str(checkpoint), str(work / "data" / "images"), "--device", device.type,
                        "--workers", "0", "--out", str(work / "predicted")],
        }
        results: dict[str, Any] = {}
        for name, arguments in chain.items():
            results[name] = _cli(arguments)
            if not results[name]["ok"]:
                break
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "allspark_cli",
                    "train", "--config", str(config), "--name", "torchrun"]
        # At WORLD_SIZE 1 the run creates no process group (check_nccl exercises NCCL on its own).
        results["torchrun"] = _launch(torchrun, work)
    return results


def check_nccl(device: torch.device) -> dict[str, Any]:
    """A 1-rank NCCL group: all_reduce and all_gather on the GPU, as a DDP run's memory update uses them."""
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    import socket

    import torch.distributed as torch_dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.cuda.set_device(device)
    torch_dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        tensor = torch.arange(4.0, device=device)
        torch_dist.all_reduce(tensor)
        parts = [torch.empty_like(tensor)]
        torch_dist.all_gather(parts, tensor)
        return {"all_reduce": bool(tensor.eq(torch.arange(4.0, device=device)).all()),
                "all_gather": bool(parts[0].eq(tensor).all())}
    finally:
        torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------------ report


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def targets(iterations: dict[str, Any], modules: dict[str, Any], full: bool) -> dict[str, Any]:
    def seconds(key):
        return iterations.get(key, {}).get("seconds")

    def peak(key):
        return iterations.get(key, {}).get("peak_gib")

    share = _ratio(modules.get("fp32/1x", {}).get("seconds"), seconds("ours/fp32/1x"))
    bf16 = _ratio(seconds("ours/fp32/1x"), seconds("ours/bf16/1x"))
    naive = _ratio(seconds("naive/fp32/1x"), seconds("ours/fp32/1x"))
    memory_ok = None
    if peak("ours/fp32/4x") is not None and peak("naive/fp32/1x") is not None:
        memory_ok = peak("ours/fp32/4x") <= peak("naive/fp32/1x")

    def met(value, bound, above):
        if value is None or not full:
            return None
        return value >= bound if above else value <= bound

    return {
        "module_share": {"value": share, "target": f"<= {TARGETS['module_share_max']}",
                         "met": met(share, TARGETS["module_share_max"], False)},
        "bf16_speedup_over_fp32": {"value": bf16, "target": f">= {TARGETS['bf16_speedup_min']}",
                                   "met": met(bf16, TARGETS["bf16_speedup_min"], True)},
        "ours_speedup_over_naive": {"value": naive, "target": f">= {TARGETS['ours_vs_naive_min']}",
                                    "met": met(naive, TARGETS["ours_vs_naive_min"], True)},
        "peak_4x_ours_within_naive_1x": {"value": memory_ok, "target": "true", "met": memory_ok if full else None},
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def print_table(report: dict[str, Any]) -> None:
    rows = [("device", report["device"], "")]
    for row in report["attention_paths"]:
        rows.append((f"attention {row['path']} {row['precision']} vs float64",
                     f"value {_cell(row['value_error'])}, grad {_cell(row['gradient_error'])}", "relative"))
    for path, ok in report["dropout_masks"].items():
        rows.append((f"dropout mask in backward, {path}", "equal" if ok else "DIFFERENT", "gradcheck"))
    for key, value in report["reference_logits"].items():
        rows.append((f"reference eval logits {key}", _cell(value), f"max abs, tolerance {EVAL_LOGITS_TOLERANCE}"))
    for key, value in report["no_sync"].items():
        rows.append((f"no host sync: {key}", value, ""))
    for key, value in report["iteration"].items():
        rows.append((f"iteration {key}", "out of memory" if value["oom"] else
                     f"{_cell(value['seconds'])} s, peak {_cell(value['peak_gib'])} GiB", ""))
    for key, value in report["accumulation"].items():
        rows.append((f"accumulation {key} micro-steps (fp32)", "out of memory" if value["oom"] else
                     f"{_cell(value['seconds'])} s, peak {_cell(value['peak_gib'])} GiB", "max_memory_allocated"))
    for key, value in report["module"].items():
        rows.append((f"module alone {key}", f"{_cell(value['seconds'])} s", ""))
    for key, value in report["end_to_end"].items():
        rows.append((f"end to end: {key}", "ok" if value.get("ok") else f"FAILED {value.get('tail', '')}",
                     f"{value.get('seconds', '')} s"))
    for key, value in report["nccl"].items():
        rows.append((f"nccl {key}", _cell(value), "1 rank"))
    for key, value in report["targets"].items():
        rows.append((f"target {key}", _cell(value["value"]), f"{value['target']}, met: {_cell(value['met'])}"))
    width = max(len(name) for name, _, _ in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value}  {note}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where the figures go")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU here; use --device cpu --smoke")
    sizes = SMOKE if args.smoke else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {"device": name, "smoke": args.smoke, "torch": torch.__version__, "sizes": sizes}
    report["attention_paths"] = check_paths(device, sizes["attention"])
    report["dropout_masks"] = check_dropout_masks(device)
    report["reference_logits"] = check_reference_logits(device)
    report["no_sync"] = check_no_sync(device)
    precisions = PRECISIONS if device.type == "cuda" else ("fp32", "bf16")  # TF32 means nothing on CPU
    report["iteration"] = {
        f"{module}/{precision_name}/{multiple}x": measure_iteration(device, sizes, precision_name, module, multiple)
        for multiple in MEMORY_MULTIPLES for module in MODULES for precision_name in precisions
    }
    report["accumulation"] = {str(n): measure_accumulation(device, sizes, n) for n in ACCUMULATION_STEPS
                              if sizes["groups"] % n == 0}
    report["module"] = {f"{precision_name}/{multiple}x": measure_module(device, sizes, precision_name, multiple)
                        for multiple in MEMORY_MULTIPLES for precision_name in precisions}
    report["end_to_end"] = end_to_end(device)
    report["nccl"] = check_nccl(device)
    report["targets"] = targets(report["iteration"], report["module"], full=not args.smoke and device.type == "cuda")
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"figures in {args.json}")


if __name__ == "__main__":
    main()
