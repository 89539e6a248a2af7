"""Folding a BatchNorm that directly follows a quantized layer into the integer layer, through the whole chain:
conversion, the report, the state dict and Lightning checkpoints, the artifact, ONNX and the callback."""

import copy
import json
import re

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from models import GroupedConvNet, fast_trainer, image_blobs, loader
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

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
from lightning_nipq.convert import batchnorm_folding, convert_to_integer, freeze_quantizers
from lightning_nipq.convert.report_rendering import rich_report_table
from lightning_nipq.layers import IntegerLayerMixin, QuantizedLayerMixin, calibrate_activations, quantizers
from lightning_nipq.layers.folded_batchnorm import FoldedBatchNorm
from lightning_nipq.saving import artifact_sizes, compare_onnx, prepare_for_state_dict, read_manifest
from lightning_nipq.saving.artifact import METADATA_KEY, _checksum

# Only the order of float operations differs between a folded layer and the layer followed by its BatchNorm.
REL_TOLERANCE = 1e-5
BatchNorm = nn.modules.batchnorm._BatchNorm


class ConvBN(nn.Module):
    """conv -> BN -> ReLU and fc -> BN1d fold; a BN after a ReLU and a BN beside a residual do not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)  # folding gives it a bias
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)  # after a ReLU
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(6)  # conv3's output also feeds the residual sum
        self.fc = nn.Linear(6, 8)
        self.bn4 = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = self.bn2(F.relu(self.conv2(h)))
        r = self.conv3(h)
        h = F.relu(self.bn3(r) + r)
        return self.head(F.relu(self.bn4(self.fc(h.mean(dim=(2, 3))))))


class LinearBN(nn.Module):
    """Linear -> BatchNorm1d twice: layers that can have ranges per group of inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32, bias=False)
        self.bn2 = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(x)))
        return self.head(F.relu(self.bn2(self.fc2(h))))


def images(n: int = 128) -> torch.Tensor:
    return image_blobs(n).tensors[0]


def vectors(n: int = 128) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(1))


def randomize_batchnorms(model: nn.Module) -> None:
    """Statistics and affine parameters far from the identity: channel 0 scaled negatively, channel 1 by zero."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g) * 1.5)
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.weight[0] = -1.3
                m.weight[1] = 0.0
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)


def fake_quantized(make, x, config=None, bits=4):
    """``make()`` with BatchNorms made unusual, quantizers attached, calibrated on ``x`` and frozen at ``bits``."""
    torch.manual_seed(0)
    model = make()
    randomize_batchnorms(model)
    attach_quantizers(model, config)
    calibrate_activations(model, list(x.split(32)), forward=lambda b: model(b))
    for _, q in quantizers(model):
        if q.learns_bits:
            q.freeze_bits(bits)
    return model


def folded_and_unfolded(make, x, config=None):
    """The same fake-quantized model converted with and without folding, and the report of the folded one."""
    model = fake_quantized(make, x, config)
    unfolded = copy.deepcopy(model)
    hard_quantize(unfolded)
    report = hard_quantize(model, compare_batches=[x[:64]], fold_batchnorm=True)
    return model.eval(), unfolded.eval(), report


def outputs_at(model, x, names):
    """The model's output and the outputs of the named modules, on ``x``."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n in names]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def assert_close(a, b):
    assert (a - b).abs().max() <= REL_TOLERANCE * b.abs().max(), float((a - b).abs().max() / b.abs().max())


CASES = {
    "per tensor": (ConvBN, images, NIPQConfig(weight_granularity="tensor"), {"bn": "conv", "bn4": "fc"}),
    "per channel": (ConvBN, images, NIPQConfig(weight_granularity="channel"), {"bn": "conv", "bn4": "fc"}),
    "per group": (LinearBN, vectors, NIPQConfig(weight_granularity=8), {"bn1": "fc1", "bn2": "fc2"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_model_equals_the_unfolded_integer_model(case):
    make, data, config, expected = CASES[case]
    x = data()
    model, unfolded, report = folded_and_unfolded(make, x, config)
    assert report.folded_batchnorms == expected
    assert report.agreement == 1.0 and max(report.layer_rel_diffs.values()) < 1e-4
    for bn, layer in expected.items():
        assert isinstance(model.get_submodule(bn), FoldedBatchNorm) and model.get_submodule(bn).into == layer
        folded, plain = model.get_submodule(layer), unfolded.get_submodule(layer)
        assert isinstance(folded, IntegerLayerMixin) and folded.bias is not None
        assert (folded.weight_scale > 0).all()
        # Per tensor becomes per channel; channels and groups keep their ranges.
        granularity = plain.weight_granularity
        assert folded.weight_granularity == ("channel" if granularity == "tensor" else granularity)
        # The negative channel's codes are negated, the zero channel's zeroed, the others kept.
        assert torch.equal(folded.weight_codes[0], -plain.weight_codes[0])
        assert not folded.weight_codes[1].any()
        assert torch.equal(folded.weight_codes[2:], plain.weight_codes[2:])
    assert not [n for n, m in model.named_modules() if isinstance(m, BatchNorm) and n in expected]
    out, folded_out = outputs_at(model, x, list(expected))
    reference, bn_out = outputs_at(unfolded, x, list(expected))
    assert_close(out, reference)
    for bn in expected:  # the folded layer's output is the BatchNorm's output
        assert_close(folded_out[bn], bn_out[bn])


def test_batchnorms_that_do_not_directly_follow_a_quantized_layer_are_kept():
    x = images()
    model, _, report = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="channel"))
    kept = dict(report.batchnorms_kept)
    assert set(kept) == {"bn2", "bn3"}
    assert "not the output of one quantized layer" in kept["bn2"]  # after a ReLU
    assert "conv3 is also used elsewhere" in kept["bn3"]  # the residual
    assert type(model.bn2) is nn.BatchNorm2d and type(model.bn3) is nn.BatchNorm2d
    assert model.conv3.bias is not None and model.conv3.weight_granularity == "channel"
    text = report.table()
    assert "BatchNorm folded into the layer before it: bn -> conv, bn4 -> fc" in text
    assert "BatchNorm kept: bn2 (" in text and "bn3 (" in text
    assert "bn -> conv" in rich_report_table(report).caption


class Unusual(nn.Module):
    """A BatchNorm on a layer output the model also returns, one with a hook, one fed a view."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.b, self.bn_b = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.c, self.bn_c = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.bn_b.register_forward_hook(lambda m, args, out: None)

    def forward(self, x):
        features = self.a(x)
        c = self.c(x)
        return self.bn_a(features) + self.bn_b(self.b(x)) + self.bn_c(c.view(c.shape)), features


def test_outputs_the_model_returns_hooks_and_views_keep_their_batchnorm():
    x = vectors()
    model = fake_quantized(Unusual, x)
    plan = batchnorm_folding.find_foldable_batchnorms(model, x[:32])
    assert plan.pairs == []
    kept = dict(plan.kept)
    assert "also used elsewhere" in kept["bn_a"] and "hooks" in kept["bn_b"] and "not the output" in kept["bn_c"]
    assert all(isinstance(m, QuantizedLayerMixin) for m in (model.a, model.b, model.c)) and model.training


def test_a_failed_fold_puts_the_whole_conversion_back(monkeypatch):
    x = images()
    model = fake_quantized(ConvBN, x)
    freeze_quantizers(model)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}

    def broken(*args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(batchnorm_folding, "replace_everywhere", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_to_integer(model, fold_batchnorm=True, fold_batch=x[:32])
    assert all(isinstance(getattr(model, n), QuantizedLayerMixin) for n in ("conv", "conv2", "conv3", "fc", "head"))
    assert type(model.bn) is nn.BatchNorm2d and model.conv.bias is None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v for k, v in before.items())


def test_invalid_fold_batchnorm_values_and_a_missing_batch_raise_before_anything_changes():
    for value in (1, "yes", None, 0.0):
        with pytest.raises(ValueError, match="fold_batchnorm must be True"):
            HardQuantize(fold_batchnorm=value)
    x = images(32)
    model = fake_quantized(ConvBN, x)
    with pytest.raises(ValueError, match="fold_batchnorm must be True"):
        hard_quantize(model, compare_batches=[x], fold_batchnorm="yes")
    with pytest.raises(ValueError, match="needs a batch"):
        hard_quantize(model, fold_batchnorm=True)
    with pytest.raises(ValueError, match="needs a batch"):
        convert_to_integer(model, fold_batchnorm=True)
    assert isinstance(model.conv, QuantizedLayerMixin) and type(model.bn) is nn.BatchNorm2d
    assert all(q.mode != "hard" or not q.learns_bits for _, q in quantizers(model))  # not frozen either
    report = hard_quantize(model, bn_batches=[x], fold_batchnorm=True)  # the re-estimation batch shows the data flow
    assert report.folded_batchnorms == {"bn": "conv", "bn4": "fc"}


def test_state_dict_of_a_folded_model_loads_into_a_fresh_model_and_back():
    x = images()
    model, _, _ = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="tensor"))
    state = model.state_dict()
    assert state["bn._extra_state"]["into"] == "conv" and "bn.running_mean" not in state
    torch.manual_seed(7)
    fresh = ConvBN()
    prepare_for_state_dict(fresh, state)
    fresh.load_state_dict(state)
    assert isinstance(fresh.bn, FoldedBatchNorm) and type(fresh.bn2) is nn.BatchNorm2d
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    # A state dict without the fold (a float model's) builds the BatchNorm back and takes off the bias folding made.
    float_state = ConvBN().state_dict()
    prepare_for_state_dict(fresh, float_state)
    fresh.load_state_dict(float_state)
    assert type(fresh.bn) is nn.BatchNorm2d and fresh.conv.bias is None and type(fresh.conv) is nn.Conv2d


def test_artifact_of_a_folded_model_loads_into_a_fresh_float_instance(tmp_path):
    x = images()
    model, _, _ = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="tensor"))
    path = save_quantized(model, tmp_path / "folded.safetensors")
    folds = read_manifest(path)["folded_batchnorms"]
    assert [(f["name"], f["into"], f["created_bias"]) for f in folds] == [("bn", "conv", True), ("bn4", "fc", False)]
    torch.manual_seed(7)
    fresh = load_quantized(path, ConvBN())
    assert isinstance(fresh.bn, FoldedBatchNorm) and isinstance(fresh.bn4, FoldedBatchNorm)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert artifact_sizes(path).file_bytes == path.stat().st_size  # the header-only reading checks the folds too


def rewrite(src, dst, edit):
    """``src`` with its manifest edited and the checksum recomputed, as anyone can."""
    with safe_open(str(src), framework="pt") as f:
        manifest = json.loads(f.metadata()[METADATA_KEY])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    edit(manifest)
    manifest["checksum"] = _checksum(manifest, tensors)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(manifest)})
    return dst


def set_fold(**values):
    def edit(manifest):
        manifest["folded_batchnorms"][0].update(values)

    return edit


@pytest.mark.parametrize(
    "edit,named",
    [
        (set_fold(into="head"), "folded_batchnorms[0].num_features"),
        (set_fold(into="nowhere"), "folded_batchnorms[0].into"),
        (lambda m: m["folded_batchnorms"][1].update(into="conv", num_features=6), "folded_batchnorms[1].into"),  # conv takes bn
        (set_fold(into="conv2"), "conv2 (built without a bias in the artifact"),  # the file's conv2.bias is its own
        (set_fold(num_features=True), "folded_batchnorms[0].num_features"),
        (set_fold(type="LayerNorm"), "folded_batchnorms[0].type"),
        (set_fold(created_bias="yes"), "folded_batchnorms[0].created_bias"),
        (set_fold(name="conv2"), "folded_batchnorms[0].name"),  # already a layer's name
        (set_fold(name="bn2"), "bn2"),  # a BatchNorm the file stores
        (set_fold(aliases=[3]), "folded_batchnorms[0]"),
        (lambda m: m.update(folded_batchnorms={"bn": "conv"}), "folded_batchnorms"),
        (lambda m: m.pop("folded_batchnorms"), "bn.running_mean"),  # the fresh BatchNorm's state is not in the file
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_artifact_fold_entries_are_checked(tmp_path, edit, named):
    x = images(64)
    model, _, _ = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="channel"))
    path = rewrite(save_quantized(model, tmp_path / "a.safetensors"), tmp_path / "bad.safetensors", edit)
    fresh = ConvBN()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ArtifactError, match=re.escape(named)):
        load_quantized(path, fresh)
    assert type(fresh.bn) is nn.BatchNorm2d and type(fresh.conv) is nn.Conv2d and fresh.conv.bias is None
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_folded_model_exports_to_onnx_and_onnxruntime_agrees(tmp_path):
    x = images(256)
    model, _, _ = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="tensor"))
    path = export_onnx(model, tmp_path / "folded.onnx", x[:2])
    agreement, _, max_rel = compare_onnx(model, path, list(x.split(64)))
    assert agreement >= 0.999 and max_rel < REL_TOLERANCE


def test_hard_quantize_callback_folds_and_the_checkpoint_reloads(tmp_path):
    ds = image_blobs(64)
    model = GroupedConvNet()
    hard = HardQuantize(verbose=False, fold_batchnorm=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fast_trainer(2, [NIPQCallback(target_bits=4, hard_epochs=1, calibration_batches=1), hard, ckpt], enable_checkpointing=True)
    trainer.fit(model, loader(ds), loader(ds))
    assert hard.report.folded_batchnorms == {"bn": "conv"} and isinstance(model.bn, FoldedBatchNorm)
    assert not any(isinstance(m, BatchNorm) for m in model.modules())
    trainer.save_checkpoint(tmp_path / "folded.ckpt")
    assert torch.load(tmp_path / "folded.ckpt", weights_only=True)["nipq"]["folded_batchnorms"] == [{"name": "bn", "into": "conv"}]
    fresh = load_nipq_checkpoint(GroupedConvNet, tmp_path / "folded.ckpt").eval()
    assert isinstance(fresh.bn, FoldedBatchNorm) and isinstance(fresh.conv, IntegerLayerMixin)
    x = ds.tensors[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    # The last checkpoint of the fit holds the fake-quantized model: its BatchNorm comes back to validate it.
    trainer.validate(model, loader(ds), ckpt_path="last", verbose=False)
    assert type(model.bn) is nn.BatchNorm2d and isinstance(model.conv, QuantizedLayerMixin)


def test_checkpoint_folds_are_checked_against_the_manifest_and_the_digest():
    from lightning_nipq import CheckpointMismatchError
    from lightning_nipq.saving.checkpoint import prepare_for_checkpoint, quantization_manifest, seal_manifest

    x = images(64)
    model, _, _ = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="channel"))

    def checkpoint():
        saved = {"state_dict": copy.deepcopy(model.state_dict()), "nipq": quantization_manifest(model)}
        seal_manifest(saved)
        return saved

    good = checkpoint()
    assert good["nipq"]["folded_batchnorms"] == [{"name": "bn", "into": "conv"}, {"name": "bn4", "into": "fc"}]
    fresh = ConvBN()
    prepare_for_checkpoint(fresh, good)
    fresh.load_state_dict(good["state_dict"])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))

    listed = checkpoint()
    listed["nipq"]["folded_batchnorms"].pop()
    edited = checkpoint()
    edited["state_dict"]["bn._extra_state"]["into"] = "conv2"
    unsealed = copy.deepcopy(edited)
    edited["nipq"]["folded_batchnorms"][0]["into"] = "conv2"  # consistent with the state dict: only the digest tells
    del unsealed["nipq"]
    cases = [
        (listed, "lists"),  # the manifest names fewer folds than the state dict holds
        (edited, "does not match the digest"),
        (unsealed, "bn: 'conv2' has a bias in the model"),  # no manifest: the model check still refuses it
    ]
    for saved, message in cases:
        fresh = ConvBN()
        with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
            prepare_for_checkpoint(fresh, saved)
        assert type(fresh.bn) is nn.BatchNorm2d and type(fresh.conv) is nn.Conv2d


def test_an_integer_model_converted_without_folding_folds_afterwards():
    x = images(64)
    model, unfolded, report = folded_and_unfolded(ConvBN, x, NIPQConfig(weight_granularity="channel"))
    folded, kept = batchnorm_folding.fold_batchnorms(unfolded, x[:32])
    assert folded == report.folded_batchnorms and dict(kept).keys() == {"bn2", "bn3"}
    with torch.no_grad():
        assert_close(unfolded(x), model(x))
    with pytest.raises(ValueError, match="needs a batch"):
        batchnorm_folding.fold_batchnorms(unfolded, None)


def test_a_model_with_an_embedding_folds_the_batchnorm_after_its_linear_layer():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.proj = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(torch.relu(self.bn(self.proj(self.embed(ids).mean(1)))))

    torch.manual_seed(0)
    model = Tokens()
    attach_quantizers(model, NIPQConfig(weight_bits=4, act_bits=4))
    ids = torch.randint(0, 20, (32, 5))
    calibrate_activations(model, [ids], forward=lambda b: model(b))
    model.eval()
    report = hard_quantize(model, compare_batches=[ids], input_fn=lambda b: b, fold_batchnorm=True)
    assert isinstance(model.bn, FoldedBatchNorm) and report.agreement == 1.0
