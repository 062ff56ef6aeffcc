"""Convergence accelerators beside DN as query plug-ins: contrastive DN (DINO), Group DETR, hybrid matching (H-DETR)
and Stable-DINO's loss and matching cost; their masks, assignments, losses and combinations on every model."""
import dataclasses
import itertools
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from dndetr.config import ConfigError, LossConfig, MatcherConfig, config_class
from dndetr.criterion import build_criterion
from dndetr.matcher import HungarianMatcher
from dndetr.models import MODELS, build_model
from dndetr.models.transformer import attention
from dndetr.plugins.base import assemble, blocked_by_parts
from dndetr.plugins.dn import Denoising, DNConfig
from dndetr.plugins.group import GroupConfig
from dndetr.plugins.hybrid import HybridConfig
from helpers import REPO_ROOT, read_metrics, tiny
from test_models import NAMES, NUM_CLASSES, make_batch, make_targets, tiny_config

torch.set_num_threads(1)
D = 32
N = 10  # matching queries of the tiny models


def build(name, dn=None, group=1, hybrid=0, k=2, seed=0, **model_overrides):
    cfg = tiny_config(name, dn, **model_overrides)
    cfg = dataclasses.replace(cfg, group=GroupConfig(groups=group), hybrid=HybridConfig(queries=hybrid, k=k))
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES)
    model.criterion = build_criterion(cfg, NUM_CLASSES)
    return model


def composed(model, targets, batch_size):
    """What the forward pass assembles in training: the blocks, the self-attention mask, the matching slice."""
    content, position = model.queries(batch_size)
    blocks = [b for p in model.plugins.values() if (b := p.build(targets, content, model)) is not None]
    queries, _, parts, matching = assemble(blocks, content, position)
    return blocks, blocked_by_parts(parts, queries.shape[1]), matching


def expected_mask(regions):
    """The published rules, written per query: a query sees its own region; DN groups also see the matching queries
    (group 0); matching, extra Group DETR groups and one-to-many queries see nothing else."""
    size = len(regions)
    allowed = torch.tensor([[regions[i] == regions[j] or (regions[i][0] == "dn" and regions[j][0] == "match")
                             for j in range(size)] for i in range(size)])
    return ~allowed


COMBINATIONS = {  # name: (dn, group K, one-to-many queries)
    "group": (None, 3, 0),
    "hybrid": (None, 1, 12),
    "dn+group": (DNConfig(groups=2), 3, 0),
    "cdn+group+hybrid": (DNConfig(num_queries=6, contrastive=True), 3, 12),
    "cdn+hybrid": (DNConfig(num_queries=6, contrastive=True), 1, 12),
}


# ----------------------------------------------------------------------------------------------------------------
# masks and the inference path


@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_no_query_sees_a_block_it_must_not_see(combo):
    dn, groups, hybrid = COMBINATIONS[combo]
    model = build("dab", dn, groups, hybrid).train()
    counts = (2, 0, 3)
    blocks, mask, matching = composed(model, make_targets(counts), len(counts))
    sizes = {b.plugin.group: b.size for b in blocks}
    dn_size = sizes.get("dn", 0)
    regions = []
    if dn:  # per group: 3 slots (largest image) per copy
        slots = 3 * dn.copies
        assert dn_size == slots * (dn.groups or dn.num_queries // 3)
        regions += [("dn", i // slots) for i in range(dn_size)]
    assert matching == slice(dn_size, dn_size + N)
    regions += [("match",)] * N
    regions += [("group", g) for g in range(1, groups) for _ in range(N)]
    regions += [("o2m",)] * hybrid
    assert sizes.get("group", 0) == (groups - 1) * N and sizes.get("hybrid", 0) == hybrid
    assert torch.equal(mask, expected_mask(regions))


def test_a_block_that_cannot_be_cut_into_its_groups_is_refused():
    from types import SimpleNamespace

    from dndetr.plugins.base import QueryBlock, attention_parts

    block = QueryBlock(SimpleNamespace(group="dn"), torch.zeros(1, 5, D), {}, groups=2)
    with pytest.raises(ValueError, match="dn: a block of 5 queries cannot be 2 equal groups"):
        attention_parts([block], slice(5, 15))


@pytest.mark.parametrize("combo", sorted(COMBINATIONS) + ["open dn+group+hybrid"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_by_parts_is_the_masked_attention(combo, precision):
    """Self-attention part by part, each part over only the keys it sees, gives the dense masked attention's
    outputs and input gradients: in fp32 through the fused kernel, under bf16 autocast through the explicit
    products. The open DN block (no attention mask) is seen by every query."""
    dn, groups, hybrid = COMBINATIONS.get(combo, (DNConfig(groups=2, attn_mask=False), 3, 12))
    model = build("dab", dn, groups, hybrid).train()
    counts = (2, 0, 3)
    content, position = model.queries(len(counts))
    blocks = [b for p in model.plugins.values() if (b := p.build(make_targets(counts), content, model)) is not None]
    queries, _, parts, matching = assemble(blocks, content, position)
    total = queries.shape[1]
    dense = blocked_by_parts(parts, total)
    if combo.startswith("open"):
        assert not dense[:, :matching.start].any() and dense[:matching.stop, matching.stop:].all()
    torch.manual_seed(1)
    q, k, v = (torch.randn(len(counts), total, D, requires_grad=True) for _ in range(3))
    weight = torch.randn(len(counts), total, D)  # a different gradient for every output element
    results = []
    for mask in (parts, dense):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = attention(q, k, v, 4, 0.0, mask)
        results.append([out.float()] + list(torch.autograd.grad((out.float() * weight).sum(), (q, k, v))))
    tolerance = 1e-5 if precision == "fp32" else 3e-2
    for by_parts, masked in zip(*results):
        assert torch.allclose(by_parts, masked, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("combo", sorted(COMBINATIONS))
def test_inference_queries_unchanged_by_training_blocks(name, combo):
    """Same weights, dropout 0: the matching queries' outputs at every layer are the same with the training-only
    blocks (targets given) and without them (no targets, and in eval mode)."""
    model = build(name, *COMBINATIONS[combo]).train()
    images, masks, targets = make_batch()
    with_blocks, without = model(images, masks, targets), model(images, masks)
    assert {b.plugin.group for b in with_blocks["query_blocks"]} == set(model.plugins)
    evaluated = model.eval()(images, masks, targets)
    assert "query_blocks" not in evaluated and evaluated["pred_logits"].shape[1] == N
    for other in (without, evaluated):
        pairs = [(a[key], b[key]) for a, b in zip(with_blocks["aux_outputs"] + [with_blocks],
                                                  other["aux_outputs"] + [other]) for key in ("pred_logits", "pred_boxes")]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("combo", ["dn+group", "cdn+group+hybrid"])
def test_combinations_train_on_every_model(name, combo):
    """Every term of every plug-in is finite and every trainable parameter gets a gradient (DN's label embedding,
    the extra query rows and the model's own)."""
    model = build(name, *COMBINATIONS[combo]).train()
    images, masks, targets = make_batch()
    losses = model.criterion(model(images, masks, targets), targets)
    assert {key.split("_loss")[0] for key in losses if not key.startswith("loss")} == set(model.plugins)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


def test_extra_queries_are_their_own_parameters_and_learn():
    model = build("conditional", group=3, hybrid=7)
    images, masks, targets = make_batch()
    group_rows = [rows["query_embed"] for rows in model.plugins["group"].extra]
    one2many = model.plugins["hybrid"].rows["query_embed"]
    assert [r.shape for r in group_rows] == [(N, D)] * 2 and one2many.shape == (7, D)
    assert not torch.allclose(group_rows[0], model.query_embed.weight)  # drawn anew, not copied
    assert not torch.allclose(group_rows[0], group_rows[1])
    out = model.train()(images, masks, targets)
    sum(model.criterion(out, targets).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in group_rows + [one2many])


def test_dab_groups_copy_anchors_and_patterns():
    model = build("dab", group=2, num_patterns=2)
    rows = model.plugins["group"].extra[0]
    assert set(rows) == {"refpoint_embed", "patterns"} and rows["refpoint_embed"].shape == (N, 4)
    blocks, _, _ = composed(model, make_targets((1,)), 1)
    assert blocks[0].size == 2 * N  # every anchor with every pattern, as in the matching part


# ----------------------------------------------------------------------------------------------------------------
# contrastive denoising


class IdentityBoxQueries:
    @staticmethod
    def box_query_position(boxes):
        return {"box": boxes}


def contrastive_block(counts, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = DNConfig(**{"num_queries": 100, "contrastive": True, **overrides})
    dn = Denoising(cfg, NUM_CLASSES, D)
    targets = make_targets(counts, seed)
    return dn, targets, dn.build(targets, torch.zeros(len(counts), 4, D), IdentityBoxQueries)


@pytest.mark.parametrize("largest", range(0, 101))
def test_contrastive_budget_holds_for_0_to_100_objects(largest):
    """DINO: groups = max(1, 100 // largest object count); at most 100 positives and 100 negatives per image."""
    dn, _, block = contrastive_block((largest, min(largest, 1)))
    groups = block.meta["groups"]
    assert groups == max(1, 100 // max(largest, 1))
    assert block.size == 2 * groups * largest <= 200
    assert int(block.meta["positive"].sum()) == int((~block.meta["positive"]).sum()) == groups * (largest + min(largest, 1))


def test_contrastive_layout_targets_and_mask():
    dn, targets, block = contrastive_block((2, 3), box_noise=0.0, label_noise=0.0)
    meta, groups = block.meta, 100 // 3
    assert block.size == groups * 6  # per group: 3 positive slots, then 3 negative slots
    within = meta["slot"] % 6
    assert torch.equal(meta["positive"], within < 3)
    clean = torch.cat([t["labels"] for t in targets]).repeat(2 * groups)
    assert torch.equal(meta["labels"][meta["positive"]], clean[meta["positive"]])
    assert (meta["labels"][~meta["positive"]] == NUM_CLASSES).all()  # negatives: only the no-object target
    assert block.groups == groups  # a group of 6 slots: a positive sees its negatives


def corner_shift(dn, box, negative):
    """Relative corner shifts |d| / (box_noise * half side) of many noised copies of one box."""
    n = 20_000
    boxes = box.repeat(n, 1)
    _, noised = dn.contrastive_noise(torch.ones(n, dtype=torch.long), boxes, torch.full((n,), negative))
    to_xyxy = lambda b: torch.cat((b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2), dim=1)  # noqa: E731
    half = box[2:].repeat(2) / 2
    return (to_xyxy(noised) - to_xyxy(boxes)).abs() / (half * dn.cfg.box_noise)


def test_contrastive_noise_positives_inside_negatives_outside():
    torch.manual_seed(0)
    dn = Denoising(DNConfig(num_queries=100, contrastive=True, box_noise=0.4), NUM_CLASSES, D)
    box = torch.tensor([0.5, 0.5, 0.3, 0.2])
    positive, negative = corner_shift(dn, box, False), corner_shift(dn, box, True)
    assert positive.max() <= 1 + 1e-4 and negative.min() >= 1 - 1e-4 and negative.max() <= 2 + 1e-4
    assert abs(positive.mean().item() - 0.5) < 0.01 and abs(negative.mean().item() - 1.5) < 0.01  # r ~ U(0,1), U(1,2)


@pytest.mark.parametrize("name", ["detr", "dab"])  # CE and focal
def test_negatives_get_no_box_loss_and_positives_reconstruct_their_boxes(name):
    model = build(name, DNConfig(num_queries=6, contrastive=True)).train()
    images, masks, targets = make_batch()
    out = model(images, masks, targets)
    block = next(b for b in out["query_blocks"] if b.plugin.group == "dn")
    block = dataclasses.replace(block, logits=block.logits.detach().requires_grad_(),
                                boxes=block.boxes.detach().requires_grad_())
    losses = model.plugins["dn"].loss(block, targets, model.criterion, num_layers=2)
    meta, positive = block.meta, block.meta["positive"]
    grad_logits, grad_boxes = torch.autograd.grad(losses["loss_bbox"] + losses["loss_giou"],
                                                  (block.logits, block.boxes), allow_unused=True)
    boxes_grad = grad_boxes[-1][meta["image"], meta["slot"]].abs().sum(-1)
    assert (boxes_grad[~positive] == 0).all() and (boxes_grad[positive] > 0).all() and grad_logits is None
    class_grad = torch.autograd.grad(losses["loss_ce"], block.logits)[0][-1][meta["image"], meta["slot"]]
    assert (class_grad.abs().sum(-1) > 0).all()  # negatives are trained too (towards no object)
    clean = torch.cat([t["boxes"] for t in targets]).repeat(2 * meta["groups"], 1)[positive]
    l1 = (block.boxes[-1][meta["image"], meta["slot"]][positive] - clean).abs().sum() / int(positive.sum())
    assert torch.allclose(losses["loss_bbox"], l1 * model.criterion.weights["loss_bbox"])


def test_plain_dn_slots_are_capped_and_logged_once(caplog):
    dn = Denoising(DNConfig(groups=1000), NUM_CLASSES, D)
    targets = make_targets((5, 2))
    with caplog.at_level(logging.WARNING):
        blocks = [dn.build(targets, torch.zeros(2, 4, D), IdentityBoxQueries) for _ in range(2)]
    assert all(b.size == 1000 and b.meta["groups"] == 200 for b in blocks)  # 1000 // 5 groups of 5 slots
    assert sum("dn.max_queries=1000" in r.getMessage() for r in caplog.records) == 1
    few = Denoising(DNConfig(groups=5), NUM_CLASSES, D).build(targets, torch.zeros(2, 4, D), IdentityBoxQueries)
    assert few.size == 25  # under the cap nothing changes


@pytest.mark.parametrize("kwargs, message", [
    ({"groups": 5, "num_queries": 100}, "dn.num_queries=100 is invalid: must be 0 when dn.groups=5"),
    ({"num_queries": 600, "contrastive": True}, "dn.num_queries=600 is invalid: needs at most dn.max_queries=1000"),
    ({"groups": 1, "max_queries": 0}, "dn.max_queries=0 is invalid"),
])
def test_dn_budget_settings_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DNConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Group DETR and hybrid matching: assignments and losses


class SpyMatcher:
    """Records every (outputs, targets, assignment) the criterion's matcher produces."""

    def __init__(self, matcher):
        self.matcher, self.calls = matcher, []

    def __getattr__(self, name):
        return getattr(self.matcher, name)

    def __call__(self, outputs, targets):
        indices = self.matcher(outputs, targets)
        self.calls.append((outputs, targets, indices))
        return indices

    def match_layers(self, layers, targets):  # recorded as one call per layer
        per_layer = self.matcher.match_layers(layers, targets)
        self.calls.extend((outputs, targets, indices) for outputs, indices in zip(layers, per_layer))
        return per_layer


def block_losses(model, plugin, counts, seed=0):
    images, masks, targets = make_batch(counts, seed=seed)
    out = model.train()(images, masks, targets)
    block = next(b for b in out["query_blocks"] if b.plugin.group == plugin)
    spy = SpyMatcher(model.criterion.matcher)
    model.criterion.matcher = spy
    losses = block.plugin.loss(block, targets, model.criterion, num_layers=2)
    model.criterion.matcher = spy.matcher
    return out, block, targets, spy.calls, losses


def brute_force(cost: np.ndarray) -> float:
    queries, objects = cost.shape
    return min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(queries), objects))


@pytest.mark.parametrize("seed", range(3))
def test_each_group_assignment_is_the_brute_force_optimum(seed):
    model = build("conditional", group=3, num_queries=5)
    counts = (2, 0, 3)
    _, block, targets, calls, _ = block_losses(model, "group", counts, seed)
    assert len(calls) == 2  # one stacked call per supervised layer
    for layer, (outputs, stacked, indices) in enumerate(calls):
        for b, g in itertools.product(range(3), range(2)):  # image, extra group
            row = b * 2 + g
            assert stacked[row] is targets[b]
            group_slice = slice(g * 5, (g + 1) * 5)
            assert torch.equal(outputs["pred_logits"][row], block.logits[layer, b, group_slice])
            single = {"pred_logits": outputs["pred_logits"][row:row + 1], "pred_boxes": outputs["pred_boxes"][row:row + 1]}
            cost = model.criterion.matcher.cost_matrices(single, [targets[b]])[0].numpy()
            rows, cols = indices[row]
            assert sorted(cols.tolist()) == list(range(counts[b])) and len(set(rows.tolist())) == counts[b]
            if counts[b]:
                assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(brute_force(cost), abs=1e-5)


@pytest.mark.parametrize("name", ["detr", "dab"])  # CE (a weighted mean) and focal (a sum)
def test_group_loss_is_the_mean_over_groups(name):
    """Group 0's terms times 1/K plus the group_ terms = the mean over the K groups of their stand-alone loss."""
    model = build(name, group=3)
    images, masks, targets = make_batch()
    out = model.train()(images, masks, targets)
    losses = model.criterion(out, targets)
    (block,) = out["query_blocks"]
    criterion = model.criterion
    num_boxes = 5.0
    groups = [(out["pred_logits"], out["pred_boxes"])] + [
        (block.logits[-1][:, g * N:(g + 1) * N], block.boxes[-1][:, g * N:(g + 1) * N]) for g in range(2)]
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        alone = [criterion.matching_losses({"pred_logits": lg, "pred_boxes": bx}, targets, num_boxes)[term]
                 for lg, bx in groups]
        expected = criterion.weights[term] * sum(alone) / 3
        assert torch.allclose(losses[term] + losses["group_" + term], expected, atol=1e-6)


def test_every_object_gets_k_one_to_many_assignments():
    model = build("dab", hybrid=12, k=3)
    counts = (2, 0, 3)
    _, _, targets, calls, losses = block_losses(model, "hybrid", counts)
    for outputs, repeated, indices in calls:
        assert outputs["pred_logits"].shape[1] == 12
        for b, (rows, cols) in enumerate(indices):
            assert len(repeated[b]["labels"]) == 3 * counts[b]
            per_object = torch.bincount(cols % max(counts[b], 1), minlength=counts[b])
            assert per_object.tolist() == [3] * counts[b]  # each object k times, each query at most once
            assert len(set(rows.tolist())) == len(rows)
            assert torch.equal(repeated[b]["boxes"][cols], targets[b]["boxes"][cols % max(counts[b], 1)])
    assert set(losses) == {f"loss_{t}{s}" for t in ("ce", "bbox", "giou") for s in ("", "_0")}


def test_hybrid_loss_weight_and_names():
    model = build("dab", hybrid=12)
    images, masks, targets = make_batch()
    out = model.train()(images, masks, targets)
    losses = model.criterion(out, targets)
    model.plugins["hybrid"].cfg.loss_weight = 0.5
    halved = model.criterion(out, targets)
    assert {k for k in losses if k.startswith("hybrid_")} == {f"hybrid_loss_{t}{s}" for t in ("ce", "bbox", "giou")
                                                                for s in ("", "_0")}
    for key, value in losses.items():
        assert torch.allclose(halved[key], value * (0.5 if key.startswith("hybrid_") else 1.0))


# ----------------------------------------------------------------------------------------------------------------
# Stable-DINO


def test_stable_loss_targets_are_rescaled_squared_ious():
    """Two matched queries in image 0 (IoU 0.5 and 0.25 -> targets 1 and 0.25), one in image 1 (IoU 0.4 -> 1)."""
    criterion = build_criterion(config_class()(loss=LossConfig(class_loss="stable")), NUM_CLASSES)
    logits = torch.randn(2, 3, 4)
    image, query, labels = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]), torch.tensor([1, 3, 0])
    ious = torch.tensor([0.5, 0.25, 0.4])
    one_layer = [tensor[None] for tensor in (logits, image, query, labels, ious)]
    (loss,) = criterion.stable_class_loss(*one_layer, normaliser=2.0)
    p = logits.sigmoid()
    expected = 0.0
    targets = {(0, 0, 1): 1.0, (0, 2, 3): 0.25, (1, 1, 0): 1.0}
    for b, q, c in itertools.product(range(2), range(3), range(4)):
        prob = p[b, q, c].item()
        t = targets.get((b, q, c))
        if t is None:
            expected += 0.75 * prob ** 2 * -np.log(1 - prob)
        else:
            expected += 0.25 * abs(t - prob) ** 2 * -(t * np.log(prob) + (1 - t) * np.log(1 - prob))
    assert loss.item() == pytest.approx(expected / 2.0, rel=1e-5)


def test_stable_loss_leaves_dn_with_the_plain_focal_loss():
    model = build("dab", DNConfig(groups=2))
    stable = dataclasses.replace(model.criterion.cfg, class_loss="stable", weight_class=6.0, weight_class_dn=1.0)
    criterion = build_criterion(config_class()(loss=stable), NUM_CLASSES)
    focal = build_criterion(config_class()(loss=dataclasses.replace(stable, class_loss="focal")), NUM_CLASSES)
    images, masks, targets = make_batch()
    out = model.train()(images, masks, targets)
    a, b = criterion(out, targets), focal(out, targets)
    assert torch.allclose(a["dn_loss_ce"], b["dn_loss_ce"]) and torch.allclose(a["loss_bbox"], b["loss_bbox"])
    assert not torch.allclose(a["loss_ce"], b["loss_ce"])
    assert criterion.fixed_target_weights["loss_ce"] == 1.0 and criterion.weights["loss_ce"] == 6.0


def random_outputs(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(len(counts), 6, NUM_CLASSES, generator=g),
               "pred_boxes": torch.rand(len(counts), 6, 4, generator=g) * 0.4 + 0.3}
    targets = make_targets(counts, seed)
    for t in targets:  # every object of class 2: the Stable-DINO code quirk would mix them across images
        t["labels"][:] = 2
    return outputs, targets


def test_position_modulated_cost_is_per_query_object_pair():
    """Batched costs equal each image's cost on its own (no mixing across images or same-class objects), and
    position_beta = 0 is the plain focal cost."""
    outputs, targets = random_outputs((2, 0, 3))  # an image without objects must not upset the others
    loss = LossConfig(class_loss="focal")
    matcher = HungarianMatcher(MatcherConfig(cost_class=2.0, position_beta=0.5), loss)
    batched = matcher.cost_matrices(outputs, targets)
    assert [c.shape for c in batched] == [(6, 2), (6, 0), (6, 3)]
    for b in range(3):
        alone = matcher.cost_matrices({k: v[b:b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert torch.allclose(batched[b], alone, atol=1e-6)
    # one pair by hand: p' = p * s'^0.5 with s' = (GIoU + 1) / 2 rescaled so the image's best pair has s' = 1
    single = {k: v[:1, :1] for k, v in outputs.items()}
    target = [{"labels": targets[0]["labels"][:1], "boxes": targets[0]["boxes"][:1]}]
    p = outputs["pred_logits"][0, 0, 2].sigmoid()  # s' is 1 for the only pair
    focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p ** 2 * -(1 - p + 1e-8).log()
    plain = HungarianMatcher(MatcherConfig(cost_class=2.0), loss)
    assert torch.allclose(matcher.cost_matrices(single, target)[0], plain.cost_matrices(single, target)[0])
    assert torch.allclose(plain.class_cost(single["pred_logits"][0], target[0]["labels"]), focal.reshape(1, 1))
    changed = matcher.cost_matrices(outputs, targets)[0]
    assert not torch.allclose(changed, plain.cost_matrices(outputs, targets)[0])


def test_position_modulation_needs_a_sigmoid_loss():
    with pytest.raises(ConfigError, match="matcher.position_beta=0.5 is invalid"):
        HungarianMatcher(MatcherConfig(position_beta=0.5), LossConfig(class_loss="ce"))


def test_model_without_query_parameters_is_refused(monkeypatch):
    from dndetr.models.detr import DETR

    monkeypatch.setattr(DETR, "query_modules", ())
    with pytest.raises(ConfigError, match="model.name='detr' is invalid: it names no matching-query parameters"):
        build("detr", group=2)


def test_two_stage_deformable_refuses_group_detr():
    """Two-stage Deformable DETR's queries are encoder proposals: no rows to draw more groups from (one line)."""
    with pytest.raises(ConfigError, match=r"^model.two_stage=true is invalid with extra learned matching queries "
                                          r"\(Group DETR\): [^\n]*$"):
        build("deformable", group=2, box_refine=True, two_stage=True)
    assert build("deformable", group=2, box_refine=True).plugins  # one-stage: the same plug-in is fine


@pytest.mark.parametrize("dn", [None, DNConfig(num_queries=6, contrastive=True)])
def test_two_stage_hybrid_branch_takes_the_next_ranked_proposals(dn):
    """H-DETR's two-stage form: the one-to-many branch's queries are the proposals ranked N+1..N+T, the matching
    queries stay the top N (outputs equal to those without the branch and in eval mode), and the branch trains."""
    T = 7
    model = build("deformable", dn, hybrid=T, box_refine=True, two_stage=True).train()
    assert not list(model.plugins["hybrid"].parameters())  # no learned rows: proposals instead
    images, masks, targets = make_batch()
    with_branch = model(images, masks, targets)
    block = next(b for b in with_branch["query_blocks"] if b.plugin.group == "hybrid")
    assert block.logits.shape[2] == T
    # The same weights with N + T queries and no branch rank the same proposals: its top N + T = ours, in order.
    wider = build("deformable", dn, box_refine=True, two_stage=True, num_queries=N + T).train()
    wider.load_state_dict(model.state_dict())
    with torch.no_grad():
        ranked = wider.propose(wider.encode(images, masks))["top"]
        ours = model.propose(model.encode(images, masks))
    assert torch.equal(torch.cat([ours["top"], model.extra_proposals["top"]], dim=1), ranked)
    # The branch's first layer reads exactly those proposals' queries.
    content, position = model.queries(images.shape[0], proposals={"top": ranked[:, N:]})
    assert torch.equal(block.position["ref"], position["ref"]) and torch.equal(block.content, content)
    evaluated = model.eval()(images, masks, targets)
    assert model.extra_proposals is None and evaluated["pred_logits"].shape[1] == N
    for other in (evaluated, model.train()(images, masks)):
        for key in ("pred_logits", "pred_boxes"):
            assert torch.allclose(with_branch[key], other[key], atol=1e-5)
    losses = model.criterion(model(images, masks, targets), targets)
    assert {"hybrid_loss_ce", "hybrid_loss_bbox", "hybrid_loss_giou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.enc_output.weight.grad is not None


@pytest.mark.parametrize("name, modules", [("deformable", {"query_embed"}),
                                           ("dab_deformable", {"refpoint_embed", "tgt_embed"}),
                                           ("dab_deformable_enc", {"refpoint_embed"})])
def test_deformable_extra_queries_are_made_like_their_own(name, modules):
    """With DN on (DAB-Deformable's content then leaves room for DN's indicator bit), every extra group has rows
    of each per-query parameter, shaped as the model's own, drawn anew."""
    model = build(name, DNConfig(groups=2), group=3)
    for rows in model.plugins["group"].extra:
        assert set(rows) == modules
        for key, value in rows.items():
            own = getattr(model, key).weight
            assert value.shape == own.shape and not torch.allclose(value, own)


def test_study_claims_name_existing_presets():
    """conf/study/accel_study.yaml parses, and each of its settings is a study preset that composes."""
    import yaml
    from dndetr.claims import load_claims
    from helpers import compose_config

    path = REPO_ROOT / "conf" / "study" / "accel_study.yaml"
    assert len(load_claims(path)) >= 6
    for setting in yaml.safe_load(path.read_text())["settings"].values():
        key, experiment = setting.split("=")
        assert key == "experiment" and (REPO_ROOT / "conf" / "experiment" / f"{experiment}.yaml").exists()
        assert compose_config([setting]).model.name == "dab"


# ----------------------------------------------------------------------------------------------------------------
# instability per Group DETR group


def test_per_group_matchings_and_instability(tmp_path):
    """instability.groups: each extra group's recorded matching is the one its queries give alone (the model with
    that group's rows as its matching queries), saved beside group 0's, and IS_group{k} compares them by epoch."""
    from dndetr import instability as inst

    model = build("conditional", group=3)
    images, masks, targets = make_batch((2, 1, 3))
    for i, t in enumerate(targets):
        t["image_id"] = 100 + i
    loader = [(images, masks, targets)]
    matcher = model.criterion.matcher
    record = inst.record_matchings(model, loader, matcher, "cpu", groups=True)
    assert len(inst.record_matchings(model, loader, matcher, "cpu")) == 5  # no group record unless asked
    group_assign = record[5]["group_assign"]
    assert group_assign.shape == (2, 3, N)
    for g, rows in enumerate(model.plugins["group"].extra):
        alone = build("conditional")
        alone.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("plugins.")})
        with torch.no_grad():
            alone.query_embed.weight.copy_(rows["query_embed"])
        assert np.array_equal(inst.record_matchings(alone, loader, matcher, "cpu")[1][-1], group_assign[g])
    inst.save_epoch(tmp_path, 0, *record)
    shifted = np.roll(group_assign, 1, axis=-1)  # a later epoch where groups 1 and 2 moved every match by a query
    inst.save_epoch(tmp_path, 1, *record[:5], extras={"group_assign": shifted})
    metrics = inst.epoch_metrics(tmp_path, 1)
    for k in (1, 2):
        assert metrics[f"IS_group{k}"] == inst.instability(group_assign[k - 1], shifted[k - 1]) > 0
    assert metrics["IS"] == 0 and metrics["IS_group_mean"] == pytest.approx(
        (metrics["IS_group1"] + metrics["IS_group2"]) / 3)


def test_modulated_cost_is_recorded_beside_the_baseline_is(tmp_path):
    """With matcher.position_beta > 0, IS uses the unmodulated cost (comparable across methods) and the training
    cost's matching is saved as position_assign -> IS_position_cost."""
    from dndetr import instability as inst

    model = build("dab")
    images, masks, targets = make_batch((2, 1, 3))
    for i, t in enumerate(targets):
        t["image_id"] = 100 + i
    loader = [(images, masks, targets)]
    loss = LossConfig(class_loss="focal")
    modulated = HungarianMatcher(MatcherConfig(cost_class=2.0, position_beta=0.5), loss)
    plain = HungarianMatcher(MatcherConfig(cost_class=2.0), loss)
    record = inst.record_matchings(model, loader, modulated, "cpu")
    assert np.array_equal(record[1], inst.record_matchings(model, loader, plain, "cpu")[1])
    assert np.array_equal(record[5]["position_assign"][0], inst.record_matchings(model, loader, _Forced(modulated),
                                                                                 "cpu")[1][-1])
    inst.save_epoch(tmp_path, 0, *record)
    moved = {"position_assign": np.roll(record[5]["position_assign"], 1, axis=-1)}
    inst.save_epoch(tmp_path, 1, *record[:5], extras=moved)
    metrics = inst.epoch_metrics(tmp_path, 1)
    assert metrics["IS"] == 0 and metrics["IS_position_cost"] == inst.instability(
        record[5]["position_assign"][0], moved["position_assign"][0]) > 0


class _Forced:
    """A matcher the recorder cannot recognise as modulated: it records with exactly this matcher's costs."""

    def __init__(self, matcher):
        self.cost_matrices, self.assign = matcher.cost_matrices, matcher.assign


# ----------------------------------------------------------------------------------------------------------------
# through train.py


@pytest.mark.slow
def test_plugin_sweep_runs_on_every_model(tmp_path):
    """`train.py -m` over the plug-ins and Stable-DINO (each with contrastive DN) on every registered model, the
    Deformable ones included."""
    sweep = tmp_path / "sweep"  # one multirun per plug-in: a Hydra sweep is a grid
    # The models train.py can build: conf/model/*.yaml (the registry may also hold models that tests register).
    configured = sorted(path.stem for path in (REPO_ROOT / "conf" / "model").glob("*.yaml"))
    assert len(configured) >= 6 and set(configured) <= set(MODELS)
    arms = [(["group.groups=3"], "group_loss_bbox"), (["hybrid.queries=20", "hybrid.k=2"], "hybrid_loss_bbox"),
            (["loss=stable_dino", "matcher=stable_dino"], "loss_ce")]
    for i, (overrides, key) in enumerate(arms):
        folder = sweep / str(i)
        args = [sys.executable, "train.py", "-m", *tiny(tmp_path, f"model={','.join(configured)}", "dn=dino",
                                                        "dn.num_queries=8", "trainer.epochs=1", *overrides),
                f"hydra.sweep.dir={folder}"]
        subprocess.run(args, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=900)
        jobs = sorted(p for p in folder.iterdir() if p.name.isdigit())
        assert len(jobs) == len(configured)
        for job in jobs:
            assert not (job / "error.txt").exists(), (job / "error.txt").read_text()
            row = read_metrics(job)[-1]
            assert np.isfinite(row[key]) and row[key] > 0, job
            assert np.isfinite(row["dn_loss_bbox"]) and "AP" in row, job
