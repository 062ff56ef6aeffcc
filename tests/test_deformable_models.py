"""The deformable models: official layouts and parameter counts, published initialisation and learning-rate groups,
denoising as a plug-in, two-stage proposals, and a DN sweep through train.py with instability recording. (Their
overfit test is tests/test_engine.py's, which covers every registered model.)"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dndetr.config import BackboneConfig, ConfigError, LossConfig, config_class
from dndetr.criterion import build_criterion
from dndetr.models import MODELS, build_model
from dndetr.models.deformable_attention import MSDeformAttn, radial_offset_bias
from dndetr.official import export_official, load_into
from dndetr.plugins.dn import DNConfig
from helpers import REPO_ROOT, read_metrics, tiny
from test_official import random_official_state, read_key_list

NAMES = ("deformable", "dab_deformable", "dab_deformable_enc")
DD = dict(name="deformable", dim_feedforward=1024, num_queries=300)
DAB = dict(dim_feedforward=2048, dropout=0.0, num_queries=300)
# key list -> (ModelConfig, DN groups, (total, trainable) parameters in millions as the spec built them)
LAYOUTS = {
    "deformable-r50.txt": (DD, 0, (40.07, 39.85)),
    "deformable_refine-r50.txt": (dict(DD, box_refine=True), 0, (40.85, 40.63)),
    "deformable_two_stage-r50.txt": (dict(DD, box_refine=True, two_stage=True), 0, (41.18, 40.96)),
    "dn_dab_deformable-r50.txt": (dict(DAB, name="dab_deformable"), 5, (47.43, 47.21)),
    "dn_dab_deformable_encoder_only-r50.txt": (dict(DAB, name="dab_deformable_enc", num_patterns=3,
                                                    pe_temperature=20.0), 5, (48.49, 48.27)),
}


def config(model: dict, dn_groups: int = 0):
    schema = MODELS[model["name"]].schema
    return config_class()(model=schema(**model), loss=LossConfig(class_loss="focal"), dn=DNConfig(groups=dn_groups))


def tiny_config(name, dn_groups=0, **overrides):
    return config({**dict(name=name, backbone=BackboneConfig(name="resnet18"), hidden_dim=32, nheads=4, enc_layers=1,
                          dec_layers=3, dim_feedforward=64, num_queries=6, dropout=0.0, enc_n_points=2,
                          dec_n_points=2), **overrides}, dn_groups)


def tiny_model(name, dn_groups=0, **overrides):
    return build_model(tiny_config(name, dn_groups, **overrides), 5)


def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :, 40:] = True
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.3]])}]
    return images, masks, targets


def unique_params(shapes: dict, shared_heads: bool) -> tuple:
    """(total, trainable) from an official key list: backbone BN tensors are buffers; a head stored under several
    names (transformer.decoder.* aliases; with ``shared_heads`` every layer's index) counts once; stem and layer1
    are frozen."""
    total = trainable = 0
    for key, shape in shapes.items():
        if re.match(r"transformer\.decoder\.(bbox|class)_embed", key):
            continue
        if shared_heads and re.match(r"(class|bbox)_embed\.[1-9]\.", key):
            continue
        if key.startswith("backbone.") and len(shape) != 4:
            continue
        numel = math.prod(shape)
        total += numel
        if not key.startswith("backbone.") or any(s in key for s in ("layer2", "layer3", "layer4")):
            trainable += numel
    return total, trainable


@pytest.mark.parametrize("keys", list(LAYOUTS))
def test_official_layout_loads_runs_and_round_trips(keys, tmp_path):
    torch.set_num_threads(1)
    overrides, groups, published = LAYOUTS[keys]
    shapes = read_key_list(keys)
    model = build_model(config(overrides, groups), 91)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == unique_params(shapes, shared_heads=(keys == "deformable-r50.txt"))
    assert (round(total / 1e6, 2), round(trainable / 1e6, 2)) == published

    state = random_official_state(shapes)
    for key in state:  # the official models save shared heads under several names: one tensor
        alias = re.sub(r"^transformer\.decoder\.(?=(class|bbox)_embed)", "", key)
        if keys == "deformable-r50.txt":
            alias = re.sub(r"^(class|bbox)_embed\.\d\.", r"\1_embed.0.", alias)
        state[key] = state[alias]
    path = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=2e-4), "epoch": 49}, path)
    load_into(model, path)
    assert torch.equal(model.state_dict()["level_embed"], state["transformer.level_embed"])
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 160, 160), torch.zeros(1, 160, 160, dtype=torch.bool))  # 534 tokens
    assert out["pred_logits"].shape[-1] == 91 and torch.isfinite(out["pred_boxes"]).all()
    exported = export_official(model)
    assert set(exported) == set(state) and all(torch.equal(exported[k], state[k]) for k in state)


def test_dab_deformable_without_dn_has_the_published_size():
    model = build_model(config(dict(DAB, name="dab_deformable")), 91)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 47.41


def attention_modules(module):
    return [m for m in module.modules() if isinstance(m, MSDeformAttn)]


@pytest.mark.parametrize("name", ["deformable", "dab_deformable"])
def test_fully_deformable_init_restores_attention_init_after_xavier(name):
    model = tiny_model(name, **({"box_refine": True} if name == "deformable" else {}))  # DAB always refines
    for attn in attention_modules(model.encoder) + attention_modules(model.decoder):
        assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
        assert torch.equal(attn.sampling_offsets.bias.detach(), radial_offset_bias(4, 4, 2))
    assert model.level_embed.std() > 0.5  # N(0, 1), not xavier
    first, second = model.bbox_embed[0][-2], model.bbox_embed[1][-2]  # torchvision MLP: ..., Linear, Dropout
    assert torch.equal(first.bias, torch.tensor([0.0, 0.0, -2.0, -2.0])) and not second.bias.any()
    assert model.class_embed[0] is not model.class_embed[1]
    assert torch.equal(model.class_embed[0].weight, model.class_embed[1].weight)  # clones of one head
    assert torch.allclose(model.class_embed[2].bias, torch.full((5,), -math.log(99)))


def test_plain_deformable_shares_one_head_and_two_stage_has_no_size_bias():
    plain = tiny_model("deformable")
    assert plain.class_embed[0] is plain.class_embed[2] and plain.bbox_embed[0] is plain.bbox_embed[2]
    assert not plain.reference_points.bias.any()
    two_stage = tiny_model("deformable", box_refine=True, two_stage=True)
    assert len(two_stage.bbox_embed) == 4 and all(not h[-2].bias.any() for h in two_stage.bbox_embed)


def test_encoder_only_variant_keeps_xavier_offsets_and_default_box_head():
    model = tiny_model("dab_deformable_enc")
    attn = attention_modules(model.encoder)[0]
    assert attn.sampling_offsets.weight.abs().sum() > 0 and attn.attention_weights.weight.abs().sum() > 0
    assert torch.equal(attn.sampling_offsets.bias.detach(), radial_offset_bias(4, 4, 2))  # 1-D: survives
    assert model.bbox_embed[-2].weight.abs().sum() > 0 and not attention_modules(model.decoder)


def lr_of(model, lr=1e-4, lr_backbone=1e-5):
    lrs = {}
    for group in model.param_groups(lr, lr_backbone):
        lrs.update({id(p): group["lr"] for p in group["params"]})
    return {name: lrs[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_learning_rate_groups_follow_each_official_code():
    dd = lr_of(tiny_model("deformable"), 2e-4, 2e-5)
    assert dd["reference_points.weight"] == dd["encoder.layers.0.self_attn.sampling_offsets.bias"] == 2e-4 * 0.1
    assert dd["decoder.layers.0.cross_attn.sampling_offsets.weight"] == pytest.approx(2e-5)
    assert dd["decoder.layers.0.cross_attn.attention_weights.weight"] == dd["level_embed"] == 2e-4
    assert dd["backbone.body.layer2.0.conv1.weight"] == 2e-5
    for name in ("dab_deformable", "dab_deformable_enc"):  # the DN/DAB repositories: two groups, no x 0.1
        rates = lr_of(tiny_model(name))
        assert set(rates.values()) == {1e-4, 1e-5}
        assert rates["encoder.layers.0.self_attn.sampling_offsets.weight"] == 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_dn_groups_zero_is_exactly_off(name):
    images, masks, targets = batch()
    torch.manual_seed(0)
    off = tiny_model(name, dn_groups=0).train()
    torch.manual_seed(0)
    on = tiny_model(name, dn_groups=3).train()
    assert not off.plugins and "dn" in on.plugins
    # Off = no DN parameter, no RNG draw: everything the two share starts equal.
    before = off.state_dict()
    shared = {k: v for k, v in on.state_dict().items() if k in before and v.shape == before[k].shape}
    assert all(torch.equal(v, before[k]) for k, v in shared.items())
    # DN-DAB-Deformable-DETR's content is one channel narrower (DN's indicator bit is appended).
    assert set(before) - set(shared) == ({"tgt_embed.weight"} if name == "dab_deformable" else set())
    assert "plugins.dn.label_enc.weight" in set(on.state_dict()) - set(before)
    assert "query_blocks" not in off(images, masks, targets)


@pytest.mark.parametrize("name", NAMES)
def test_dn_plugs_in_and_matching_queries_never_see_it(name):
    images, masks, targets = batch()
    torch.manual_seed(0)
    model = tiny_model(name, dn_groups=2).train()
    with_dn = model(images, masks, targets)
    without = model(images, masks)  # the same matching queries, no DN part
    assert with_dn["query_blocks"][0].boxes.shape[2] == 2 * 2  # groups x the largest object count
    # The attention mask keeps DN queries out of the matching queries' self-attention.
    assert torch.allclose(with_dn["pred_boxes"], without["pred_boxes"], atol=1e-5)
    assert torch.allclose(with_dn["pred_logits"], without["pred_logits"], atol=1e-4)
    losses = build_criterion(tiny_config(name, 2), 5)(with_dn, targets)
    assert {"dn_loss_ce", "dn_loss_bbox_0", "loss_giou_1"} <= set(losses)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_two_stage_proposals_and_their_class_agnostic_loss():
    images, masks, targets = batch()
    model = tiny_model("deformable", box_refine=True, two_stage=True).train()
    out = model(images, masks, targets)
    tokens = 8 * 8 + 4 * 4 + 2 * 2 + 1
    assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, 5)
    losses = build_criterion(tiny_config("deformable"), 5)(out, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    with pytest.raises(ConfigError, match=r"model.num_queries=100 \(with any hybrid.queries\) is invalid for these images: .* the 85 encoder"):
        tiny_model("deformable", box_refine=True, two_stage=True, num_queries=100)(images, masks)
    with pytest.raises(ConfigError, match="model.two_stage=true is invalid without model.box_refine=true"):
        tiny_model("deformable", two_stage=True)


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_the_image_s_detections_much(name):
    """Padding an image changes level sizes, so outputs are not bit-equal (as in the official models), but the
    valid-ratio scaling keeps references on the same image content."""
    torch.manual_seed(0)
    model = tiny_model(name).eval()
    image = torch.randn(1, 3, 128, 128)
    padded = torch.zeros(1, 3, 128, 256)
    padded[..., :128] = image
    mask = torch.zeros(1, 128, 256, dtype=torch.bool)
    mask[..., 128:] = True
    with torch.no_grad():
        a = model(image, torch.zeros(1, 128, 128, dtype=torch.bool))
        b = model(padded, mask)
    assert torch.isfinite(b["pred_boxes"]).all()
    assert (a["pred_boxes"] - b["pred_boxes"]).abs().max() < 0.05


@pytest.mark.slow
def test_dn_sweep_and_instability_recording_on_every_deformable_model(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *tiny(tmp_path, f"model={','.join(NAMES)}", "dn.groups=0,2",
                                                    "trainer.epochs=2"), f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=1200)
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert len(jobs) == 6
    for job in jobs:
        row = read_metrics(job)[-1]
        dn_on = int((job / ".hydra" / "overrides.yaml").read_text().count("dn.groups=2"))
        assert ("dn_loss_bbox" in row) == bool(dn_on), job
        assert np.isfinite(row["loss_bbox"]) and "IS" in row and "AP50" in row, job
        matchings = np.load(job / "matchings" / "epoch_0001.npz")
        queries = 30 if "dab_deformable_enc" in (job / ".hydra" / "overrides.yaml").read_text() else 10
        assert matchings["assign"].shape[1:] == (8, queries), job  # 8 validation images; 3 patterns: 30
