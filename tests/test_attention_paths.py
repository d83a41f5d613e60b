"""The labeled branch's three attention paths (eager, sdpa, frugal) compute the same thing: values
and gradients in float64/float32, bf16 and fp16 against float64, dropout statistics; and `auto`
picks by device and free memory (fake free-memory figures: no GPU is needed), once per model, and
the training banner names the path."""
from __future__ import annotations

import pytest
import torch

from allspark_cli.engine.settings_layers import build_settings
from allspark_cli.errors import SettingsError
from allspark_cli.model import allspark as allspark_module
from allspark_cli.model import attention_paths as paths
from allspark_cli.model.allspark import AllSparkModule, MemoryStep
from allspark_cli.model.attention import quantized_dropout
from allspark_cli.model.attention_paths import (
    choose_path,
    eager_map_bytes,
    frugal_budget,
    labeled_attention,
    map_std,
    project_channels,
    sdpa_attention,
)

PATHS = ("eager", "sdpa", "frugal")
GIB = 2**30


def _inputs(dtype=torch.float64, *, images=3, rows=8, tokens=5, channels=6, sources=2, seed=0):
    """queries (B, R, N), sources (M, N, C), key/value weights (R, C); N = 5 is not a multiple of 8."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()  # noqa: E731
    return make(images, rows, tokens), make(sources, tokens, channels), make(rows, channels), make(rows, channels)


def _run(path, queries, sources, key_weight, value_weight, **kwargs):
    return labeled_attention(queries, sources, key_weight, value_weight, path=path, **kwargs)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("path", ["eager", "sdpa"])
def test_paths_equal_the_frugal_function_in_value_and_gradient(path, dtype, tolerance):
    inputs = _inputs(dtype)
    upstream = torch.randn(3, 8, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))
    frugal = _run("frugal", *inputs)
    ours = _run(path, *inputs)
    torch.testing.assert_close(ours, frugal, rtol=tolerance, atol=tolerance)
    for grad_ours, grad_frugal in zip(torch.autograd.grad(ours, inputs, upstream),
                                      torch.autograd.grad(frugal, inputs, upstream)):
        torch.testing.assert_close(grad_ours, grad_frugal, rtol=tolerance, atol=tolerance)


def test_map_std_equals_the_std_of_the_formed_map_and_its_gradient():
    queries, sources, key_weight, _ = _inputs()
    keys = project_channels(key_weight, sources)
    formed = (queries @ keys.transpose(0, 1)).flatten(1)
    expected = torch.sqrt(formed.var(1, unbiased=False) + 1e-5)
    torch.testing.assert_close(map_std(queries, keys), expected)
    assert torch.autograd.gradcheck(lambda q, k: map_std(q, k), (queries, keys))


@pytest.mark.parametrize("amp_dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("path", PATHS)
def test_half_precision_paths_stay_close_to_float64(path, amp_dtype, tolerance):
    """Under autocast every path keeps its products in the half type and its norm in fp32: relative
    error of values and gradients (max abs error / max abs value) within the half type's rounding."""
    inputs64 = _inputs(torch.float64, rows=16, tokens=12, channels=16, sources=4)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    upstream = torch.randn(3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    reference = _run("eager", *inputs64)
    grads_reference = torch.autograd.grad(reference, inputs64, upstream)
    with torch.autocast("cpu", dtype=amp_dtype):
        ours = _run(path, *inputs32)
    assert ours.dtype == amp_dtype
    grads_ours = torch.autograd.grad(ours.float(), inputs32, upstream.float())
    for got, want in zip((ours, *grads_ours), (reference, *grads_reference)):
        error = (got.double() - want).abs().max() / want.abs().max()
        assert error < tolerance, f"{path} {amp_dtype}: relative error {error:.2e}"


@pytest.mark.parametrize("path", ["eager", "frugal"])
def test_fp16_gradients_stay_finite_at_the_grad_scalers_initial_scale(path):
    """The GradScaler starts at 2**16: with a realistic upstream gradient (a loss averaged over many
    pixels) the instance-norm sums, which run in fp32, do not overflow the fp16 gradients."""
    scale = 2.0**16
    queries, sources, key_weight, value_weight = (t.detach().float().requires_grad_() for t in
                                                  _inputs(images=2, rows=64, tokens=16, channels=32, sources=8))
    upstream = 1e-4 * torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(3))
    inputs = (queries, sources, key_weight, value_weight)
    reference = torch.autograd.grad(_run("eager", *inputs), inputs, upstream)
    with torch.autocast("cpu", dtype=torch.float16):
        out = _run(path, *inputs)
    scaled = torch.autograd.grad(out.float(), inputs, upstream * scale)
    for got, want in zip(scaled, reference):
        assert torch.isfinite(got).all()
        assert ((got / scale - want).abs().max() / want.abs().max()) < 1e-2


@pytest.mark.parametrize("path", ["eager", "sdpa"])
def test_dropout_gradient_is_that_of_the_forward_mask(path):
    """Finite differences of a function whose mask is fixed by re-seeding before every evaluation."""
    queries, sources, key_weight, value_weight = _inputs(images=2, rows=4, tokens=3, channels=3)
    weights = torch.randn(2, 4, 3, dtype=torch.float64)

    def run(q, src, kw, vw):
        torch.manual_seed(123)
        return (_run(path, q, src, kw, vw, dropout_p=0.5) * weights).sum()

    assert torch.autograd.gradcheck(run, (queries, sources, key_weight, value_weight), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_statistics_match_the_formula(path):
    """Over many draws each output entry has mean sum_j a_j v_j (dropout is unbiased) and variance
    p / (1 - p) * sum_j a_j^2 v_j^2 (independent Bernoulli masks, p quantised on the frugal path).
    The draws are the images of one batch of copies of one image: each image gets its own mask."""
    torch.manual_seed(0)
    draws, p = 3000, 0.1
    effective = quantized_dropout(p)[1] if path == "frugal" else p
    queries, sources, key_weight, value_weight = (t.detach() for t in _inputs(images=1, rows=4, tokens=3, channels=4))
    keys, values = project_channels(key_weight, sources), project_channels(value_weight, sources)
    attention = torch.softmax(torch.nn.functional.instance_norm((queries @ keys.T)[:, None], eps=1e-5)[:, 0], -1)
    mean = (attention @ values)[0]
    variance = effective / (1 - effective) * (attention.square() @ values.square())[0]
    copies = queries.expand(draws, -1, -1).contiguous()
    outs = _run(path, copies, sources, key_weight, value_weight, dropout_p=p)
    z_scores = (outs.mean(0) - mean) / (variance / draws).sqrt()
    assert z_scores.abs().max() < 4.5
    ratio = outs.var(0) / variance
    assert abs(ratio.mean().item() - 1) < 0.05 and ratio.min() > 0.8 and ratio.max() < 1.2


@pytest.mark.parametrize("path", ["eager", "sdpa"])
def test_the_module_gives_the_same_training_output_and_gradients_on_every_path(path):
    """The whole AllSpark module (memory read as keys/values) with dropout off: same output, same
    parameter gradients as on the frugal path."""

    def step(attention_path):
        torch.manual_seed(0)
        module = AllSparkModule(16, 3, 2, memory_multiple=1, memory_tokens=4, attention_dropout=0.0,
                                projection_dropout=0.0, attention_path=attention_path).double()
        generator = torch.Generator().manual_seed(1)
        features_l, features_u = (torch.randn(2, 16, 2, 2, dtype=torch.float64, generator=generator) for _ in "lu")
        out_l, out_u = module.forward_train(features_l, features_u, memory_step=MemoryStep(use_memory=True))
        (out_l.square().sum() + out_u.sum()).backward()
        return out_l, {name: p.grad for name, p in module.named_parameters()}

    out_frugal, grads_frugal = step("frugal")
    out_path, grads_path = step(path)
    torch.testing.assert_close(out_path, out_frugal)
    for name, grad in grads_frugal.items():
        torch.testing.assert_close(grads_path[name], grad, msg=name)


def test_sdpa_takes_unprojected_keys_too():
    queries, sources, key_weight, value_weight = (t.detach() for t in _inputs())
    keys, values = project_channels(key_weight, sources), project_channels(value_weight, sources)
    torch.testing.assert_close(sdpa_attention(queries, keys, values), _run("eager", queries, sources, key_weight,
                                                                           value_weight))


def test_auto_is_frugal_on_cpu_whatever_the_memory():
    assert choose_path("auto", "cpu", images=8, rows=1024, keys=21504, free_bytes=1000 * GIB) == "frugal"


def test_auto_on_cuda_is_eager_when_the_maps_fit_and_frugal_when_not():
    pascal = {"images": 8, "rows": 1024, "keys": 21 * 1024}  # 8 images, 1x C memory: 4.2 GiB of eager maps
    need = eager_map_bytes(**pascal)
    assert choose_path("auto", "cuda", **pascal, free_bytes=80 * GIB) == "eager"
    assert choose_path("auto", "cuda", **pascal, free_bytes=int(need / paths.EAGER_FREE_MEMORY_SHARE)) == "eager"
    assert choose_path("auto", "cuda", **pascal, free_bytes=int(need / paths.EAGER_FREE_MEMORY_SHARE) - 1) == "frugal"
    coco_4x = {"images": 8, "rows": 1024, "keys": 4 * 81 * 1024}
    assert choose_path("auto", "cuda", **coco_4x, free_bytes=40 * GIB) == "frugal"


@pytest.mark.parametrize("requested", PATHS)
def test_an_explicit_path_is_taken_on_any_device(requested):
    for device_type in ("cpu", "cuda"):
        assert choose_path(requested, device_type, images=1, rows=1, keys=1, free_bytes=0) == requested


def test_the_frugal_budget_comes_from_the_device():
    assert frugal_budget("cuda", 40 * GIB) == int(paths.FRUGAL_FREE_MEMORY_SHARE * 40 * GIB)
    assert frugal_budget("cpu", 0) == paths.SAVED_MAPS_BUDGET_BYTES


def test_the_setting_reaches_the_module_and_is_validated(tmp_path):
    from allspark_cli.engine.settings import model_config_for
    from allspark_cli.model.config import build_model

    layer = {"data": {"manifest": str(tmp_path), "split": "1", "crop": 64},
             "model": {"backbone": "b0", "head_dim": 32, "pretrained": None, "attention_path": "eager"}}
    model = build_model(model_config_for(build_settings(base=layer), 3))
    assert model.allspark.labeled_attention.attention_path == "eager"
    with pytest.raises(SettingsError, match="model.attention_path: Input should be 'auto', 'eager', 'frugal' or 'sdpa'"):
        build_settings(base=layer, sets=["model.attention_path=fused"])


def _spy_on_the_rule(monkeypatch, answers):
    """Replaces the `auto` rule the module applies with one that answers `answers` in turn, and
    returns the list of the sizes it was asked about."""
    asked = []

    def rule(requested, device_type, **sizes):
        asked.append(sizes)
        return answers[len(asked) - 1]

    monkeypatch.setattr(allspark_module, "choose_path", rule)
    return asked


def test_auto_is_decided_once_not_per_call(monkeypatch):
    """A rule that would answer differently on the second call is asked once: every later call (the
    memory read after warm-up included) keeps the first answer."""
    asked = _spy_on_the_rule(monkeypatch, ["eager", "frugal"])
    module = AllSparkModule(16, 3, 2, memory_multiple=1, memory_tokens=4).double()
    features_l, features_u = (torch.randn(2, 16, 2, 2, dtype=torch.float64) for _ in "lu")
    for use_memory in (False, True, True):
        module.forward_train(features_l, features_u, memory_step=MemoryStep(use_memory=use_memory))
    assert len(asked) == 1
    assert module.labeled_attention.chosen_path == "eager"


def test_the_run_settles_the_path_for_its_largest_call(monkeypatch):
    """With the memory, the largest call is a step's labeled images against every memory class group;
    without it, a group's labeled images against the group's unlabeled ones."""
    asked = _spy_on_the_rule(monkeypatch, ["eager", "eager"])
    with_memory = AllSparkModule(16, 3, 2, memory_multiple=2, memory_tokens=4)  # 3 classes x 2 groups of C slots
    assert with_memory.settle_attention_path(group_images=2, step_images=4) == "eager"
    without = AllSparkModule(16, 3, 2)
    without.settle_attention_path(group_images=2, step_images=4)
    assert asked == [{"images": 4, "rows": 32, "keys": 32 * 6, "free_bytes": 0},
                     {"images": 2, "rows": 32, "keys": 32 * 2, "free_bytes": 0}]
    without.settle_attention_path(group_images=8, step_images=8)  # settled: not asked again
    assert len(asked) == 2


def test_an_explicit_path_is_never_ruled_on(monkeypatch):
    asked = _spy_on_the_rule(monkeypatch, [])
    module = AllSparkModule(16, 3, 2, attention_path="sdpa")
    assert module.settle_attention_path(group_images=2, step_images=2) == "sdpa"
    assert asked == []


def test_the_training_banner_names_the_path_the_run_took(tmp_path, monkeypatch):
    from train_fixtures import make_dataset, tiny_layer

    from allspark_cli.engine.training.train import train

    asked = _spy_on_the_rule(monkeypatch, ["frugal"])
    manifest = make_dataset(tmp_path / "data", num_train=4, num_val=1)
    done = train(build_settings(base=tiny_layer(manifest, tmp_path / "runs", train={"warmup_epochs": 1})))
    log = (done.run_dir / "train.log").read_text()
    assert "labeled attention frugal (auto);" in log
    assert len(asked) == 1  # one decision for the run, before its banner
