"""Model structure: output shapes, DAB anchors and patterns, Conditional's shared reference, padding masks.

The helpers at the top (tiny configs, a fixed batch) are also used by test_dn.py.
"""
import dataclasses

import pytest
import torch

from dndetr.config import BackboneConfig, LossConfig, config_class
from dndetr.criterion import build_criterion
from dndetr.models import MODELS, build_model
from dndetr.models.transformer import mlp_last_linear
from dndetr.plugins.dn import DNConfig

torch.set_num_threads(1)
NUM_CLASSES = 5  # category ids 1..4 plus the unused id 0, as num_classes = max id + 1
NAMES = sorted(MODELS)


def tiny_config(name: str, dn: DNConfig = None, **overrides):
    """A whole configuration around a tiny model: DETR with the CE loss, the others with the focal loss."""
    model = MODELS[name].schema(name=name, backbone=BackboneConfig(name="resnet18"), hidden_dim=32, nheads=4,
                                enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=10, dropout=0.0)
    loss = LossConfig(class_loss="ce" if name == "detr" else "focal")
    return config_class()(model=dataclasses.replace(model, **overrides), loss=loss, dn=dn or DNConfig())


def build(name: str, dn: DNConfig = None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_config(name, dn, **overrides), NUM_CLASSES)
    model.loss_cfg = LossConfig(class_loss="ce" if name == "detr" else "focal")
    return model


def criterion_for(model):
    return build_criterion(config_class()(loss=model.loss_cfg), NUM_CLASSES)


def make_targets(counts, seed: int = 0):
    """Targets with the given object counts per image: labels in 1..4, boxes well inside the image."""
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(1, NUM_CLASSES, (n,), generator=g),
             "boxes": torch.cat((torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                 torch.rand(n, 2, generator=g) * 0.3 + 0.1), dim=1)} for n in counts]


def make_batch(counts=(2, 0, 3), size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(counts), 3, size, size, generator=g)
    return images, torch.zeros(len(counts), size, size, dtype=torch.bool), make_targets(counts, seed)


def randomise_box_head(model) -> None:
    """Conditional and DAB zero-init the last box layer (boxes = references); give it weights so layers differ."""
    last = mlp_last_linear(model.bbox_embed)
    with torch.no_grad():
        last.weight.normal_(0, 0.5)
        last.bias.normal_(0, 0.5)


# ----------------------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name):
    model = build(name, dec_layers=3).eval()
    images, masks, _ = make_batch()
    out = model(images, masks)
    classes = NUM_CLASSES + 1 if name == "detr" else NUM_CLASSES  # CE keeps a no-object logit, focal does not
    assert out["pred_logits"].shape == (3, 10, classes)
    assert out["pred_boxes"].shape == (3, 10, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (3, 10, classes) and aux["pred_boxes"].shape == (3, 10, 4)
    assert "dn" not in out
    assert "aux_outputs" not in build(name, aux_loss=False).eval()(images, masks)


def test_dab_patterns_multiply_queries():
    model = build("dab", num_patterns=3).eval()
    images, masks, _ = make_batch()
    out = model(images, masks)
    assert out["pred_logits"].shape[1] == 30
    content, position = model.matching_queries(1)
    # pattern-major: query p*N + n pairs pattern p with anchor n
    assert torch.equal(content[0, 12], model.patterns.weight[1])
    assert torch.equal(position["anchor"][0, 12], model.refpoint_embed.weight[2])


# ----------------------------------------------------------------------------------------------------------------
# DAB: anchors refined layer by layer, detached between layers


def dab_decode(model, images, masks):
    memory, padding_mask, pos = model.encode(images, masks)
    content, position = model.matching_queries(images.shape[0])
    return model.decode(content, position, memory, padding_mask, pos, None)


def test_dab_anchors_refined_per_layer_and_detached():
    model = build("dab", dec_layers=3).train()
    randomise_box_head(model)
    images, masks, _ = make_batch()
    hs, references = dab_decode(model, images, masks)
    assert references.shape == (3, 3, 10, 4)
    assert torch.allclose(references[0], model.refpoint_embed.weight.sigmoid().expand(3, -1, -1))
    for layer in (1, 2):
        assert not torch.allclose(references[layer], references[layer - 1], atol=1e-3)
        # the refined anchor of layer l is the previous anchor moved by the box head's offset
        expected = (model.bbox_embed(hs[layer - 1]) + torch.logit(references[layer - 1], eps=1e-3)).sigmoid()
        assert torch.allclose(references[layer], expected, atol=1e-5)
    # The refined anchor used for the layer's box prediction keeps its graph (references[l] requires grad)...
    boxes = model.predict_boxes(hs, references)
    grad = torch.autograd.grad(boxes[2].sum(), references)[0]
    assert grad[2].abs().sum() > 0 and grad[:2].abs().sum() == 0


def test_dab_anchor_is_detached_before_the_next_layer():
    """...but it enters the next layer as a constant: the sine embedding fed to ref_point_head has no graph
    beyond layer 0. (Later layers still depend on refpoint_embed through the content, as in DAB-DETR, so
    refpoint_embed gets a gradient even when only the last layer's boxes are supervised.)"""
    model = build("dab", dec_layers=3).train()
    randomise_box_head(model)
    anchor_sines = []
    model.decoder.ref_point_head.register_forward_hook(lambda module, inputs, output: anchor_sines.append(inputs[0]))
    images, masks, _ = make_batch()
    model(images, masks)
    assert [s.requires_grad for s in anchor_sines] == [True, False, False]


def test_dab_box_head_starts_at_zero_so_every_layer_predicts_its_anchor():
    model = build("dab").eval()
    images, masks, _ = make_batch()
    out = model(images, masks)
    anchors = model.refpoint_embed.weight.sigmoid().expand(3, -1, -1)
    assert torch.allclose(out["pred_boxes"], anchors, atol=1e-6)
    assert torch.allclose(out["aux_outputs"][0]["pred_boxes"], anchors, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Conditional: one reference point per query, shared by all layers


def test_conditional_reference_is_shared_across_layers():
    model = build("conditional", dec_layers=3).eval()
    randomise_box_head(model)
    images, masks, _ = make_batch()
    out = model(images, masks)
    reference = model.decoder.ref_point_head(model.query_embed.weight).sigmoid()
    memory, padding_mask, pos = model.encode(images, masks)
    content, position = model.matching_queries(3)
    hs, references = model.decode(content, position, memory, padding_mask, pos, None)
    assert torch.allclose(references[0], reference, atol=1e-6) and references.shape == (3, 10, 2)
    for layer, boxes in enumerate([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]):
        offsets = model.bbox_embed(hs[layer])
        assert torch.allclose(boxes[..., :2], (offsets[..., :2] + torch.logit(reference, eps=1e-5)).sigmoid(),
                              atol=1e-5)
        assert torch.allclose(boxes[..., 2:], offsets[..., 2:].sigmoid(), atol=1e-5)  # size predicted directly


# ----------------------------------------------------------------------------------------------------------------
# padding masks


def outputs_with_feature_noise(model, images, masks, on_padding: bool):
    """Forward pass with large noise added to the backbone features at padded (or at valid) positions only."""
    def add_noise(module, inputs, output):
        features, mask = output
        where = mask if on_padding else ~mask
        return features + 100.0 * torch.rand_like(features) * where[:, None], mask

    hook = model.backbone.register_forward_hook(add_noise)
    try:
        return model(images, masks)
    finally:
        hook.remove()


@pytest.mark.parametrize("name", NAMES)
def test_padded_positions_do_not_influence_outputs(name):
    """CNN features at padded positions are never attended to (encoder keys, decoder cross-attention keys).

    Pixel values in the padding do change the valid region's CNN features (receptive field), so the test
    perturbs the backbone's output features at padded positions instead.
    """
    model = build(name, enc_layers=2).eval()
    images = torch.randn(2, 3, 64, 128)
    masks = torch.zeros(2, 64, 128, dtype=torch.bool)
    masks[0, :, 64:] = True  # image 0 is 64x64 padded on the right: feature columns 2, 3 are padding
    assert model.backbone(images, masks)[1][0].sum() == 4
    base = model(images, masks)
    padding_noise = outputs_with_feature_noise(model, images, masks, on_padding=True)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(base[key], padding_noise[key], atol=1e-5)
    valid_noise = outputs_with_feature_noise(model, images, masks, on_padding=False)  # the hook does bite
    assert not torch.allclose(base["pred_logits"][0], valid_noise["pred_logits"][0], atol=1e-3)
