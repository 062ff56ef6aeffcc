"""Official checkpoint layouts: strict loading, a forward pass, an exact export round trip, parameter counts.

The key lists (``key (shape)`` per line) are the official ``model`` state dicts of DETR, Conditional DETR,
DAB-DETR and DN-DAB-DETR (ResNet-50, COCO) at their default settings.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
from pathlib import Path

import pytest
import torch

from dndetr.config import BackboneConfig, ConfigError, LossConfig, config_class
from dndetr.models import MODELS, build_model
from dndetr.plugins.dn import DNConfig
from dndetr.official import (export_official, load_checkpoint_file, load_into, official_to_ours,
                             ours_to_official)

# The state-dict layouts of the official checkpoints (copied from the project's spec, shared/spec/official_keys).
KEYS_DIR = Path(os.environ.get("DNDETR_OFFICIAL_KEYS", Path(__file__).resolve().parent / "data/official_keys"))

DAB = dict(num_queries=300, activation="prelu", dropout=0.0, pe_temperature=20.0)
# layout -> (key list, model name, ModelConfig overrides, DN groups, (total, trainable) params in millions,
# as published in the official READMEs / logs; None where only the key list defines it)
LAYOUTS = {
    "detr": ("detr-r50.txt", "detr", {}, 0, (41.52, 41.30)),
    "conditional": ("conditional-r50.txt", "conditional", dict(num_queries=300), 0,
                    (43.42, 43.20)),
    "dab": ("dab-r50.txt", "dab", DAB, 0, (43.67, 43.45)),
    "dn_dab": ("dn_dab-r50.txt", "dab", DAB, 5, None),
}
DN_LABEL_PARAMS = 92 * 255  # DN-DAB-DETR's label_enc: (num_classes + 1) x (hidden_dim - 1)


def read_key_list(name: str) -> dict:
    path = KEYS_DIR / name
    if not path.is_file():
        pytest.skip(f"official key list {path} not found (set DNDETR_OFFICIAL_KEYS)")
    shapes = {}
    for line in path.read_text().splitlines():
        key, dims = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip()).groups()
        shapes[key] = tuple(int(d) for d in dims.split(",") if d.strip())
    return shapes


def build(layout: str):
    _, name, overrides, groups, _ = LAYOUTS[layout]
    model = MODELS[name].schema(name=name, backbone=BackboneConfig(name="resnet50"), **overrides)
    loss = LossConfig(class_loss="ce" if name == "detr" else "focal")
    return build_model(config_class()(model=model, loss=loss, dn=DNConfig(groups=groups)), 91)


def random_official_state(shapes: dict) -> dict:
    """Random tensors in the official layout, scaled so a forward pass stays finite (positive BN variances)."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 1.0
        if key.startswith("transformer.decoder.bbox_embed."):  # DAB-DETR: the same module as bbox_embed
            state[key] = state[key[len("transformer.decoder."):]]
    return state


def counted_params(shapes: dict) -> tuple:
    """(total, trainable) parameters from a key list, counted as the official code does: FrozenBatchNorm2d's
    tensors are buffers (only the backbone's 4-D conv weights are parameters), DAB-DETR's decoder alias of the
    box head is the same parameter, and the ResNet stem and layer1 are frozen."""
    total = trainable = 0
    for key, shape in shapes.items():
        backbone = key.startswith("backbone.")
        if (backbone and len(shape) != 4) or key.startswith("transformer.decoder.bbox_embed."):
            continue
        numel = torch.Size(shape).numel()
        total += numel
        if not backbone or any(stage in key for stage in ("layer2", "layer3", "layer4")):
            trainable += numel
    return total, trainable


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_official_layout_loads_runs_and_round_trips(layout, tmp_path):
    torch.set_num_threads(1)
    shapes = read_key_list(LAYOUTS[layout][0])
    model = build(layout)

    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == counted_params(shapes)
    published = LAYOUTS[layout][4]
    if published is not None:
        assert (round(total / 1e6, 2), round(trainable / 1e6, 2)) == published
    else:  # DN-DAB-DETR = DAB-DETR + the label embedding
        assert total == counted_params(read_key_list(LAYOUTS["dab"][0]))[0] + DN_LABEL_PARAMS

    state = random_official_state(shapes)
    path = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4, backbone="resnet50"), "epoch": 49}, path)
    load_into(model, path)
    ours = model.state_dict()
    assert torch.equal(ours["backbone.body.conv1.weight"], state["backbone.0.body.conv1.weight"])
    assert torch.equal(ours["bbox_embed.6.weight"], state["bbox_embed.layers.2.weight"])
    assert torch.equal(ours["encoder.layers.5.ffn.linear2.bias"], state["transformer.encoder.layers.5.linear2.bias"])

    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    num_logits = 92 if layout == "detr" else 91
    assert out["pred_logits"].shape == (1, 100 if layout == "detr" else 300, num_logits)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()

    exported = export_official(model)
    assert len(exported) == len(state) and set(exported) == set(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)

    # Our own checkpoint format loads back into a fresh model.
    ours_path = tmp_path / "ours.pth"
    torch.save({"model": ours, "epoch": 3}, ours_path)
    fresh = build(layout)
    load_into(fresh, ours_path)
    assert all(torch.equal(v, ours[k]) for k, v in fresh.state_dict().items())


def test_key_mapping_rules():
    official = {
        "backbone.0.body.layer1.0.bn1.running_var": torch.ones(2),
        "transformer.encoder.query_scale.layers.1.weight": torch.ones(2),
        "transformer.decoder.layers.3.linear1.bias": torch.ones(2),
        "transformer.decoder.layers.3.activation.weight": torch.ones(1),
        "transformer.decoder.ref_point_head.layers.0.bias": torch.ones(2),
        "transformer.patterns.weight": torch.ones(3, 2),
        "bbox_embed.layers.2.bias": torch.full((4,), 2.0),
        "transformer.decoder.bbox_embed.layers.2.bias": torch.full((4,), 2.0),
        "label_enc.weight": torch.ones(92, 255),
    }
    ours = official_to_ours(official, "dab")
    assert set(ours) == {
        "backbone.body.layer1.0.bn1.running_var", "encoder.query_scale.3.weight", "decoder.layers.3.ffn.linear1.bias",
        "decoder.layers.3.ffn.activation.weight", "decoder.ref_point_head.0.bias", "patterns.weight",
        "bbox_embed.6.bias", "plugins.dn.label_enc.weight"}
    assert ours_to_official(ours, "dab").keys() == official.keys()

    diverged = dict(official, **{"transformer.decoder.bbox_embed.layers.2.bias": torch.zeros(4)})
    with pytest.raises(ConfigError, match="same tensor as 'bbox_embed.layers.2.bias'"):
        official_to_ours(diverged, "dab")
    with pytest.raises(ConfigError, match="does not share its box head"):
        official_to_ours(official, "conditional")
    with pytest.raises(ConfigError, match="model.name='no_such_model'"):
        official_to_ours(official, "no_such_model")


def small_model(name: str):
    model = MODELS[name].schema(name=name, backbone=BackboneConfig(name="resnet18"), hidden_dim=32, nheads=2,
                                enc_layers=1, dec_layers=2, dim_feedforward=32, num_queries=5)
    return build_model(config_class()(model=model), 5)


def test_load_into_reports_mismatches(tmp_path):
    path = tmp_path / "detr.pth"
    torch.save({"model": export_official(small_model("detr"))}, path)
    expected = r"fit model 'conditional': \d+ missing \(e.g. decoder.layers.0.sa_qcontent_proj.*; \d+ unexpected"
    with pytest.raises(ConfigError, match=expected):
        load_into(small_model("conditional"), path)

    state = small_model("detr").state_dict()
    state["query_embed.weight"] = torch.zeros(7, 32)
    torch.save(state, path)  # a bare state dict of ours
    expected = r"fit model 'detr': 1 shape mismatches \(e.g. query_embed.weight \(7, 32\) != \(5, 32\)\)$"
    with pytest.raises(ConfigError, match=expected):
        load_into(small_model("detr"), path)


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bad_files_are_rejected_with_clear_errors(tmp_path):
    state = {"w": torch.randn(64, 64)}
    good = tmp_path / "good.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, good)
    assert torch.equal(load_checkpoint_file(good)["w"], state["w"])

    with pytest.raises(ConfigError, match="file not found"):
        load_checkpoint_file(tmp_path / "absent.pth")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated.pth' is unreadable"):
        load_checkpoint_file(truncated)

    foreign = tmp_path / "foreign.pth"
    torch.save({"model": state, "path": pathlib.PurePosixPath("/data")}, foreign)
    with pytest.raises(ConfigError, match="refused: it pickles pathlib.PurePosixPath"):
        load_checkpoint_file(foreign)

    payload = Payload()
    payload.marker = tmp_path / "payload_ran"
    malicious = tmp_path / "malicious.pth"
    torch.save({"model": state, "x": payload}, malicious)
    with pytest.raises(ConfigError, match=r"refused: it pickles (posix|os)\.system"):
        load_checkpoint_file(malicious)
    assert not payload.marker.exists()

    for content in ({"epoch": 3}, {"model": {"w": [1, 2]}}, [torch.zeros(1)]):
        torch.save(content, good)
        with pytest.raises(ConfigError, match="holds no state dict"):
            load_checkpoint_file(good)


def test_dn_checkpoint_needs_denoising_on(tmp_path):
    model = small_model("dab")
    state = export_official(model)
    state["label_enc.weight"] = torch.zeros(6, 31)
    path = tmp_path / "dn_dab.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ConfigError, match=r"1 unexpected \(e.g. plugins.dn.label_enc.weight\) .*dn.groups > 0"):
        load_into(model, path)
