"""Per-channel and per-group ranges through checkpoints, the artifact and ONNX (per-axis and blockwise)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from models import MLP, GroupedConvNet, TinyTransformer, blobs, fast_trainer, image_blobs, loader
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_nipq import (
    ArtifactError,
    HardQuantize,
    NIPQCallback,
    NIPQConfig,
    attach_quantizers,
    export_onnx,
    hard_quantize,
    load_nipq_checkpoint,
    load_quantized,
    save_quantized,
)
from lightning_nipq.layers import IntegerLayerMixin, calibrate_activations, quantizers
from lightning_nipq.saving import artifact_sizes, compare_onnx
from lightning_nipq.saving.artifact import METADATA_KEY, SCALES_SUFFIX, _checksum


def integer_model(make, x, granularity, quantize_inputs=True, seed=0):
    torch.manual_seed(seed)
    model = make()
    attach_quantizers(model, NIPQConfig(weight_granularity=granularity), quantize_inputs=quantize_inputs)
    calibrate_activations(model, list(x.split(16))[:4], forward=lambda b: model(b))
    g = torch.Generator().manual_seed(seed)
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits(int(torch.randint(max(2, q.lowest_bits), 5, (1,), generator=g)))
    hard_quantize(model)
    return model.eval()


CASES = [
    (MLP, lambda: blobs(256).tensors[0], "channel", True),
    (MLP, lambda: blobs(256).tensors[0], 8, True),
    (MLP, lambda: blobs(256).tensors[0], 8, False),
    (GroupedConvNet, lambda: image_blobs(128).tensors[0], "channel", True),
    (TinyTransformer, lambda: blobs(256).tensors[0], 4, True),
]
IDS = ["MLP-channel", "MLP-group8", "MLP-group8-weight-only", "GroupedConvNet-channel", "TinyTransformer-group4"]


@pytest.mark.parametrize("make,data,granularity,inputs", CASES, ids=IDS)
def test_artifact_round_trip_keeps_every_range_and_stays_near_its_ideal_size(tmp_path, make, data, granularity, inputs):
    x = data()
    model = integer_model(make, x, granularity, inputs)
    path = save_quantized(model, tmp_path / "model.safetensors")
    manifest = json.loads(safe_open(str(path), "pt").metadata()[METADATA_KEY])
    assert {entry["weight_granularity"] for entry in manifest["layers"]} == {granularity}
    assert all((entry["input_bits"] is None) != inputs or entry["name"] == manifest["layers"][0]["name"] for entry in manifest["layers"])
    fresh = load_quantized(path, make())
    for (name, original), (_, loaded) in zip(model.named_modules(), fresh.named_modules()):
        if isinstance(original, IntegerLayerMixin):
            assert loaded.weight_granularity == granularity and torch.equal(loaded.weight_scale, original.weight_scale), name
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    steps = sum(m.weight_scale.numel() for m in model.modules() if isinstance(m, IntegerLayerMixin))
    assert artifact_sizes(path).other_bytes >= 4 * steps  # the ideal size counts every step


@pytest.mark.parametrize("granularity", ["channel", 32])
def test_an_artifact_with_ranges_per_channel_or_group_stays_within_1_15x_of_its_ideal_size(tmp_path, granularity):
    x = torch.randn(64, 256)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))  # noqa: E731
    model = integer_model(make, x, granularity)
    sizes = artifact_sizes(save_quantized(model, tmp_path / "m.safetensors"))
    assert sizes.ratio_to_ideal <= 1.15, sizes


def _rewrite(path, edit):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(f.metadata()[METADATA_KEY])
    edit(manifest, tensors)
    manifest["checksum"] = _checksum(manifest, tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(manifest)})


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m, t: t.update({"stem.weight_scale.ranges": -t["stem.weight_scale.ranges"]}), "must be finite and positive"),
        (lambda m, t: t.update({"stem.weight_scale.ranges": t["stem.weight_scale.ranges"][:-1]}), "float32 steps of shape"),
        (lambda m, t: t.pop("stem.weight_scale.ranges"), "float32 steps of shape"),
        (lambda m, t: m["layers"][0].update(weight_granularity=5), "does not fit the layer"),
        (lambda m, t: m["layers"][0].update(weight_granularity="rows"), "weight_granularity must be"),
        (lambda m, t: t.update({"extra." + SCALES_SUFFIX: torch.ones(2)}), "no entry of layers names"),
    ],
    ids=["negative", "short", "missing", "group-that-does-not-fit", "unknown", "unclaimed"],
)
def test_damaged_steps_are_refused_before_the_model_changes(tmp_path, edit, match):
    x = blobs(64).tensors[0]
    path = save_quantized(integer_model(MLP, x, "channel"), tmp_path / "m.safetensors")
    _rewrite(path, edit)
    target = MLP()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ArtifactError, match=match):
        load_quantized(path, target)
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("granularity", ["channel", 8])
def test_checkpoints_resume_and_reload_per_channel_and_per_group_models(tmp_path, granularity):
    ds = blobs(128)
    model = MLP()
    trainer = fast_trainer(
        2,
        [NIPQCallback(target_bits=3, hard_epochs=1, weight_granularity=granularity, calibration_batches=1), HardQuantize(verbose=False)],
    )
    trainer.fit(model, loader(ds), loader(ds))
    trainer.save_checkpoint(tmp_path / "int.ckpt")
    fresh = load_nipq_checkpoint(MLP, tmp_path / "int.ckpt").eval()
    x = ds.tensors[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    # A noise-phase checkpoint holds per-range quantizer parameters and rebuilds them.
    noisy = MLP()
    trainer = fast_trainer(1, [NIPQCallback(target_bits=3, hard_epochs=0, weight_granularity=granularity, calibration_batches=1)])
    trainer.fit(noisy, loader(ds))
    trainer.save_checkpoint(tmp_path / "noise.ckpt")
    reloaded = load_nipq_checkpoint(MLP, tmp_path / "noise.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), noisy.eval()(x))
    assert all(q.granularity == granularity for name, q in quantizers(reloaded) if name.endswith("weight_quantizer"))


def test_a_checkpoint_whose_ranges_do_not_fit_the_layer_is_refused(tmp_path):
    ds = blobs(64)
    model = MLP()
    trainer = fast_trainer(1, [NIPQCallback(target_bits=3, hard_epochs=0, weight_granularity="channel", calibration_batches=1)])
    trainer.fit(model, loader(ds))
    path = tmp_path / "noise.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["state_dict"]
    key = next(k for k in state if k.endswith("weight_quantizer._extra_state"))
    state[key]["config"]["range_shape"] = (3, 1)
    state[key.replace("_extra_state", "alpha_raw")] = torch.zeros(3, 1)
    checkpoint.get("nipq", {}).pop("state_sha256", None)
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"ranges of shape \(3, 1\) in the checkpoint"):
        load_nipq_checkpoint(MLP, path)


@pytest.mark.parametrize("make,data,granularity,inputs", CASES, ids=IDS)
def test_onnx_export_dequantizes_per_axis_and_per_block_and_onnxruntime_agrees(tmp_path, make, data, granularity, inputs):
    x = data()
    model = integer_model(make, x, granularity, inputs)
    path = export_onnx(model, tmp_path / "model.onnx", x[:2])
    graph = onnx.load(str(path)).graph
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in dequantize]
    if granularity == "channel":
        assert any("axis" in a and not a.get("block_size") for a in attributes)  # opset 21 writes block_size=0
    else:
        assert any(a.get("block_size") == granularity and a.get("axis") == 1 for a in attributes)
        assert next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")) == 21
    agreement, _, max_rel = compare_onnx(model, path, list(x.split(64)))
    assert agreement >= 0.999
    assert max_rel < 1e-5


def test_blockwise_export_needs_opset_21(tmp_path):
    x = blobs(64).tensors[0]
    model = integer_model(MLP, x, 8)
    with pytest.raises(ValueError, match="blockwise DequantizeLinear needs opset >= 21"):
        export_onnx(model, tmp_path / "m.onnx", x[:2], opset=18)
