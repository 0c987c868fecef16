"""Least-squares refit, layer-sequential calibration and --offload on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from lmprune.errors import UserError
from lmprune.pruning.pretrained.calibration import CalibStats
from lmprune.pruning.pretrained.layerwise import LayerOptions, LayerView, RefitLog, prune_layer_ffn_
from lmprune.pruning.pretrained.offload import OffloadedLayers, SafetensorsWeights, load_offloaded
from lmprune.pruning.pretrained.oneshot import prune_model
from lmprune.pruning.pretrained.reconstruct import refit_columns, relative_output_error, residual_mean_bias
from lmprune.pruning.pretrained.sequential import (
    SequentialTimes,
    _measure,
    _patched_outputs,
    _run,
    capture_layer_inputs,
)
from test_oneshot import calib_batches, logits, tiny_model

torch.set_num_threads(1)


def random_layer(out: int = 6, channels: int = 10, tokens: int = 200, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, channels, generator=generator, dtype=torch.float64)
    mixing = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, channels, generator=generator, dtype=torch.float64) @ mixing  # correlated channels
    kept = torch.tensor([0, 2, 3, 5, 8, 9])
    return weight, x, kept


@pytest.mark.parametrize("damp", [1e-8, 0.01, 0.5])
def test_refit_equals_lstsq_of_the_damped_problem(damp):
    weight, x, kept = random_layer()
    gram = x.T @ x
    refit = refit_columns(weight, gram, kept, damp)
    # ridge as ordinary least squares: [X_S; sqrt(lam) I] B = [X W^T; 0]
    lam = damp * gram.diagonal().mean()
    system = torch.cat([x[:, kept], lam.sqrt() * torch.eye(len(kept), dtype=x.dtype)])
    target = torch.cat([x @ weight.T, torch.zeros(len(kept), weight.shape[0], dtype=x.dtype)])
    expected = torch.linalg.lstsq(system, target).solution.T
    torch.testing.assert_close(refit, expected, rtol=1e-8, atol=1e-10)
    sliced_error = ((x @ weight.T - x[:, kept] @ weight[:, kept].T).norm() / (x @ weight.T).norm()).item()
    refit_error = ((x @ weight.T - x[:, kept] @ refit.T).norm() / (x @ weight.T).norm()).item()
    assert relative_output_error(weight, gram, kept, weight[:, kept]) == pytest.approx(sliced_error, rel=1e-9)
    assert relative_output_error(weight, gram, kept, refit) == pytest.approx(refit_error, rel=1e-9)
    if damp < 0.1:
        assert refit_error < 0.9 * sliced_error  # the test can fail: the refit must matter here


def test_residual_mean_bias_is_flap_compensation_without_refit():
    weight, x, kept = random_layer()
    mean = x.mean(0)
    pruned = torch.ones(weight.shape[1], dtype=torch.bool)
    pruned[kept] = False
    torch.testing.assert_close(residual_mean_bias(weight, weight[:, kept], mean, kept), weight[:, pruned] @ mean[pruned])


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("criterion", ["wanda-sp", "flap", "taylor", "magnitude"])
def test_refit_never_increases_a_layers_calibration_error(criterion, sequential):
    model = tiny_model()
    report = prune_model(model, calib_batches(count=4), criterion, ffn_ratio=0.5, heads_ratio=0.5,
                         reconstruct=True, sequential=sequential)
    refit = report["refit"]
    assert report["reconstruct"] and len(refit["ffn_error_refit"]) == 3 and len(refit["attn_error_refit"]) == 3
    for sliced, fitted in (*zip(refit["ffn_error_sliced"], refit["ffn_error_refit"]),
                           *zip(refit["attn_error_sliced"], refit["attn_error_refit"])):
        assert fitted <= sliced + 1e-9
    assert sum(refit["ffn_error_refit"]) < 0.95 * sum(refit["ffn_error_sliced"])
    assert report["seconds"]["refit"] > 0 and report["seconds"]["calibration_forward"] > 0


def test_reconstruct_defaults_on_except_for_magnitude():
    assert prune_model(tiny_model(), calib_batches(), "activation", ffn_ratio=0.5)["reconstruct"]
    report = prune_model(tiny_model(), None, "magnitude", ffn_ratio=0.5)
    assert not report["reconstruct"] and report["refit"]["ffn_error_refit"] == []


def test_patched_outputs_equal_running_the_pruned_layer_again():
    model = tiny_model()
    inputs = capture_layer_inputs(model, calib_batches(), torch.device("cpu"))
    layer, times = model.model.layers[1], SequentialTimes()
    down = layer.mlp.down_proj
    acc, outputs, down_inputs = _measure(layer, down, inputs, True, times, keep=True)
    old_weight, old_bias = down.weight, down.bias
    options = LayerOptions("flap", reconstruct=True, damp=0.01, ffn_bias=True, attn_bias=False)
    kept = prune_layer_ffn_(LayerView(model, layer), CalibStats(ffn_inputs=[acc]), 32, options, RefitLog())
    assert down.bias is not None  # FLAP's mean shift was added, and the patch must include it
    patched = _patched_outputs(outputs, down_inputs, down, old_weight, old_bias, down, kept, times)
    for got, expected in zip(patched, _run(layer, inputs, times)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sequential_calibration_sees_the_pruned_predecessors():
    one_pass, sequential = tiny_model(), tiny_model()
    a = prune_model(one_pass, calib_batches(count=4), "wanda-sp", ffn_ratio=0.5, sequential=False)
    b = prune_model(sequential, calib_batches(count=4), "wanda-sp", ffn_ratio=0.5, sequential=True)
    assert a["refit"]["ffn_error_refit"][0] == pytest.approx(b["refit"]["ffn_error_refit"][0])  # same layer 0
    assert a["refit"]["ffn_error_refit"][2] != pytest.approx(b["refit"]["ffn_error_refit"][2])  # inputs differ


@pytest.mark.parametrize("kwargs,message", [
    (dict(damp=0.0), "--damp must be > 0"),
    (dict(damp=-1.0), "--damp must be > 0"),
    (dict(calib=[torch.zeros(1, 8, dtype=torch.long)]), "8 tokens, fewer than the 32 FFN neurons"),
    (dict(sequential=False, layer_source=object()), "--offload .* needs --sequential"),
    (dict(criterion="taylor", layer_source=object()), "taylor needs the whole model"),
])
def test_bad_refit_inputs_raise_one_user_error_before_any_work(kwargs, message):
    model = tiny_model()
    before = logits(model)
    with pytest.raises(UserError, match=message):
        prune_model(model, kwargs.pop("calib", calib_batches()), kwargs.pop("criterion", "flap"), ffn_ratio=0.5,
                    **kwargs)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("extra", [dict(ffn_ratio=0.5), dict(heads_ratio=0.5, drop_layers=1)])
def test_offload_gives_the_same_model_as_in_memory(tmp_path, extra):
    original = tiny_model()
    original.save_pretrained(tmp_path)
    in_memory = copy.deepcopy(original)
    expected = prune_model(in_memory, calib_batches(), "wanda-sp", **extra)
    skeleton, weights = load_offloaded(tmp_path, torch.float32)
    assert all(p.is_meta for p in skeleton.model.layers.parameters())
    source = OffloadedLayers(skeleton, weights, torch.device("cpu"), torch.float32)
    report = prune_model(skeleton, calib_batches(), "wanda-sp", layer_source=source, **extra)
    assert report["params_after"] == expected["params_after"]
    assert report["dropped_layers"] == expected["dropped_layers"]
    assert not any(p.is_meta for p in skeleton.parameters())
    torch.testing.assert_close(logits(skeleton), logits(in_memory), atol=1e-5, rtol=1e-5)


def test_offload_refuses_a_dir_without_safetensors(tmp_path):
    with pytest.raises(UserError, match="--offload needs a model dir with safetensors"):
        SafetensorsWeights(tmp_path)
