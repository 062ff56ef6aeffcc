"""Query denoising (dndetr/plugins/dn.py) and how the three models and the criterion use it."""
import dataclasses

import pytest
import torch

from dndetr.plugins.base import assemble, blocked_by_parts
from dndetr.plugins.dn import Denoising, DNConfig
from test_models import NAMES, NUM_CLASSES, build, criterion_for, make_batch, make_targets

torch.set_num_threads(1)
D = 32


class IdentityBoxQueries:
    """A model whose positional query is the box itself, so the assembled position holds the noised boxes."""

    @staticmethod
    def box_query_position(boxes):
        return {"box": boxes}


def prepare(cfg: DNConfig, counts, num_matching: int = 4, seed: int = 0):
    """Build the DN block and assemble it with the matching queries: (content, position, mask, meta)."""
    torch.manual_seed(seed)
    dn = Denoising(cfg, NUM_CLASSES, D)
    targets = make_targets(counts, seed)
    content = torch.randn(len(counts), num_matching, D)
    matching_boxes = torch.rand(len(counts), num_matching, 4)
    block = dn.build(targets, content, IdentityBoxQueries)
    queries, position, parts, _ = assemble([block], content, {"box": matching_boxes})
    mask = None if parts is None else blocked_by_parts(parts, queries.shape[1])
    return dn, targets, content, matching_boxes, (queries, position, mask, dict(block.meta, pad_size=block.size))


def dn_outputs(out: dict) -> dict:
    """The DN block's outputs and bookkeeping as one dict."""
    (block,) = out["query_blocks"]
    return dict(block.meta, logits=block.logits, pred_boxes=block.boxes)


# ----------------------------------------------------------------------------------------------------------------
# attention mask and slot layout


def paper_mask(groups: int, per_group: int, num_matching: int) -> torch.Tensor:
    """DN-DETR's formula (P1 4.4), W = P*M + N: a_ij = 1 if j < P*M and (floor(i/M) != floor(j/M) or i >= P*M)."""
    pad = groups * per_group
    size = pad + num_matching
    return torch.tensor([[j < pad and (i // per_group != j // per_group or i >= pad) for j in range(size)]
                         for i in range(size)])


def test_attention_mask_matches_the_paper_formula():
    _, _, _, _, (_, _, mask, meta) = prepare(DNConfig(groups=3), counts=(2, 0, 3), num_matching=4)
    assert meta["pad_size"] == 9  # per_group = 3 (largest image), 3 groups
    assert mask.dtype == torch.bool and mask.shape == (13, 13)
    assert torch.equal(mask, paper_mask(3, 3, 4))
    assert mask[9:, :9].all()  # matching rows see no DN column
    assert not mask[:, 9:].any()  # every row sees the matching part
    for g in range(3):
        rows = slice(3 * g, 3 * g + 3)
        assert not mask[rows, rows].any()  # a group sees all its slots, padding included
        assert mask[rows, :9].sum() == 3 * 6  # and none of the other two groups' 6 columns


def test_attention_mask_off_or_without_objects():
    assert prepare(DNConfig(groups=3, attn_mask=False), counts=(2, 0, 3))[4][2] is None
    content, _, mask, meta = prepare(DNConfig(groups=3), counts=(0, 0))[4]
    assert mask is None and meta["pad_size"] == 0 and content.shape == (2, 4, D)


def test_slot_layout_and_padding_slots():
    noiseless = DNConfig(groups=3, box_noise=0.0, label_noise=0.0)
    dn, targets, content, matching_boxes, (queries, position, _, meta) = prepare(noiseless, counts=(2, 0, 3))
    boxes = position["box"]
    assert queries.shape == (3, 9 + 4, D) and boxes.shape == (3, 9 + 4, 4)
    # the matching part follows the DN part unchanged
    assert torch.equal(queries[:, 9:], content) and torch.equal(boxes[:, 9:], matching_boxes)
    real = torch.zeros(3, 9, dtype=torch.bool)
    for b, target in enumerate(targets):
        for g in range(3):
            for j, (label, box) in enumerate(zip(target["labels"], target["boxes"])):
                slot = g * 3 + j
                real[b, slot] = True
                assert torch.equal(boxes[b, slot], box)
                assert torch.equal(queries[b, slot, :-1], dn.label_enc.weight[label])
                assert queries[b, slot, -1] == 1  # indicator: a DN query
    assert real.sum() == 3 * 5
    assert (queries[:, :9][~real] == 0).all()  # padding: zero content, indicator 0
    assert (boxes[:, :9][~real] == 0.5).all()  # padding: the centred box
    # bookkeeping for the loss: group-major, clean targets
    assert meta["image"].tolist() == [0, 0, 2, 2, 2] * 3
    assert meta["slot"].tolist() == [0, 1, 0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 6, 7, 8]
    assert torch.equal(meta["boxes"], torch.cat([t["boxes"] for t in targets]).repeat(3, 1))


def test_matching_content_is_the_unknown_label_with_indicator_zero():
    dn = Denoising(DNConfig(groups=2), NUM_CLASSES, D)
    content = dn.adjust_matching(torch.zeros(D), {})[0]
    assert content.shape == (D,) and content[-1] == 0
    assert torch.equal(content[:-1], dn.label_enc.weight[NUM_CLASSES])


# ----------------------------------------------------------------------------------------------------------------
# noise statistics


N = 20_000


def relative_noise(cfg: DNConfig, seed: int = 0):
    """Box noise on N copies of one box far from the border: centre shift / (w/2) and w'/w - 1 (x and y, w and h)."""
    torch.manual_seed(seed)
    dn = Denoising(cfg, NUM_CLASSES, D)
    box = torch.tensor([0.5, 0.4, 0.2, 0.3])
    _, noised = dn.noise(torch.ones(N, dtype=torch.long), box.repeat(N, 1))
    return (noised[:, :2] - box[:2]) / (box[2:] / 2), noised[:, 2:] / box[2:] - 1


def assert_uniform(values: torch.Tensor, half_width: float):
    """values ~ U(-half_width, half_width): inside the range and its deciles where a uniform puts them."""
    assert values.abs().max() <= half_width + 1e-6
    quantiles = torch.quantile(values.flatten(), torch.linspace(0.1, 0.9, 9))
    expected = torch.linspace(-0.8, 0.8, 9) * half_width
    assert torch.allclose(quantiles, expected, atol=0.02 * half_width + 1e-6)


@pytest.mark.parametrize("cfg, lambda1, lambda2", [
    (DNConfig(groups=1, box_noise=0.4), 0.4, 0.4),
    (DNConfig(groups=1, box_noise=0.4, center_shift=0.1), 0.1, 0.4),
    (DNConfig(groups=1, box_noise=0.4, box_scale=0.8), 0.4, 0.8),
    (DNConfig(groups=1, box_noise=0.4, center_shift=0.0, box_scale=0.2), 0.0, 0.2),
])
def test_box_noise_is_uniform_with_the_configured_scales(cfg, lambda1, lambda2):
    shift, scale = relative_noise(cfg)
    assert_uniform(shift, lambda1)  # |dx| <= lambda1 * w / 2
    assert_uniform(scale, lambda2)  # w' in [(1 - lambda2) w, (1 + lambda2) w]


def test_box_noise_is_clamped_to_the_image():
    dn = Denoising(DNConfig(groups=1, box_noise=0.9), NUM_CLASSES, D)
    boxes = torch.tensor([[0.98, 0.02, 0.9, 0.9]]).repeat(N, 1)
    _, noised = dn.noise(torch.ones(N, dtype=torch.long), boxes)
    assert noised.min() >= 0 and noised.max() <= 1
    assert (noised[:, 0] == 1).any() and (noised[:, 1] == 0).any() and (noised[:, 2:] == 1).any()


@pytest.mark.parametrize("label_noise", [0.0, 0.2, 1.0])
def test_label_flipping_rate(label_noise):
    """A flip draws a class uniformly from 0..C-1, possibly the same one: P(changed) = p (1 - 1/C)."""
    torch.manual_seed(0)
    dn = Denoising(DNConfig(groups=1, label_noise=label_noise), NUM_CLASSES, D)
    labels = torch.full((N,), 2)
    noised, _ = dn.noise(labels, torch.full((N, 4), 0.5))
    expected = label_noise * (1 - 1 / NUM_CLASSES)
    tolerance = 5 * (expected * (1 - expected) / N) ** 0.5 + 1e-9  # 5 binomial standard deviations
    assert abs((noised != labels).float().mean().item() - expected) <= tolerance
    if label_noise == 1.0:  # every class, the unused id 0 included, is drawn equally often
        counts = torch.bincount(noised, minlength=NUM_CLASSES).float() / N
        assert torch.allclose(counts, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES), atol=0.015)


def test_targets_stay_clean():
    cfg = DNConfig(groups=4, label_noise=1.0, box_noise=0.5)
    _, targets, _, _, (queries, position, _, meta) = prepare(cfg, counts=(3, 5))
    clean_labels = torch.cat([t["labels"] for t in targets]).repeat(4)
    clean_boxes = torch.cat([t["boxes"] for t in targets]).repeat(4, 1)
    assert torch.equal(meta["labels"], clean_labels) and torch.equal(meta["boxes"], clean_boxes)
    noised_boxes = position["box"][meta["image"], meta["slot"]]
    assert not torch.allclose(noised_boxes, clean_boxes, atol=1e-3)  # the queries themselves are noised


# ----------------------------------------------------------------------------------------------------------------
# DN losses


def dn_forward(name, counts=(2, 0, 3), **dn_overrides):
    model = build(name, DNConfig(groups=3, **dn_overrides)).train()
    images, masks, targets = make_batch(counts)
    return model, targets, model(images, masks, targets)


@pytest.mark.parametrize("name", ["detr", "dab"])  # CE and focal class losses
def test_padding_slots_are_never_supervised(name):
    model, targets, out = dn_forward(name)
    (block,) = out["query_blocks"]
    block = dataclasses.replace(block, logits=block.logits.detach().requires_grad_(),
                                boxes=block.boxes.detach().requires_grad_())
    dn = dn_outputs({"query_blocks": [block]})
    losses = model.plugins["dn"].loss(block, targets, criterion_for(model), num_layers=block.logits.shape[0])
    total = sum(losses.values())
    grad_logits, grad_boxes = torch.autograd.grad(total, (block.logits, block.boxes))
    real = torch.zeros(3, 9, dtype=torch.bool)
    real[dn["image"], dn["slot"]] = True
    assert real.sum() == 3 * 5
    assert (grad_logits[:, ~real] == 0).all() and (grad_boxes[:, ~real] == 0).all()
    assert (grad_logits[:, real].abs().sum(-1) > 0).all() and (grad_boxes[:, real].abs().sum(-1) > 0).all()


def test_dn_loss_terms_normalisation_and_weight():
    """Every layer gets dn_loss_{ce,bbox,giou}[_i], normalised by the number of real DN queries (not objects),
    weighted like the matching loss and scaled by dn.loss_weight."""
    model, targets, out = dn_forward("dab")
    criterion = criterion_for(model)
    losses = criterion(out, targets)
    assert {k for k in losses if k.startswith("dn_")} == {
        f"dn_loss_{term}{suffix}" for term in ("ce", "bbox", "giou") for suffix in ("", "_0")}
    dn = dn_outputs(out)
    for layer, suffix in ((-1, ""), (0, "_0")):  # computed together, each layer its own
        l1 = (dn["pred_boxes"][layer][dn["image"], dn["slot"]] - dn["boxes"]).abs().sum() / 15  # 5 objects x 3
        assert torch.allclose(losses["dn_loss_bbox" + suffix], criterion.weights["loss_bbox"] * l1)
    model.plugins["dn"].cfg.loss_weight = 0.5
    halved = criterion(out, targets)
    for key, value in losses.items():
        assert torch.allclose(halved[key], value * (0.5 if key.startswith("dn_") else 1.0))


@pytest.mark.parametrize("name", NAMES)
def test_batch_without_objects_gives_zero_dn_loss_and_gradients_everywhere(name):
    model, targets, out = dn_forward(name, counts=(0, 0))
    assert dn_outputs(out)["logits"].shape[2] == 0
    losses = criterion_for(model)(out, targets)
    dn_terms = [v for k, v in losses.items() if k.startswith("dn_")]
    assert len(dn_terms) == 6 and all(v.item() == 0 for v in dn_terms)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"


# ----------------------------------------------------------------------------------------------------------------
# on/off, the matching part, inference


@pytest.mark.parametrize("name", NAMES)
def test_groups_zero_is_exactly_off(name):
    """DNConfig(groups=0) builds no DN module and draws nothing: same weights, outputs, losses and RNG state as
    dn=None (dropout on, so the outputs also check that both consume the random stream identically)."""
    models = [build(name, dn, seed=3, dropout=0.1) for dn in (None, DNConfig(groups=0))]
    off, zero = models
    assert not off.plugins and not zero.plugins
    assert not [n for n in zero.state_dict() if "dn" in n or "label_enc" in n]
    state_off, state_zero = off.state_dict(), zero.state_dict()
    assert state_off.keys() == state_zero.keys()
    assert all(torch.equal(state_off[k], state_zero[k]) for k in state_off)
    images, masks, targets = make_batch()
    results = []
    for model in models:
        torch.manual_seed(11)
        out = model.train()(images, masks, targets)
        results.append((out, criterion_for(model)(out, targets), torch.get_rng_state()))
    (out_a, loss_a, rng_a), (out_b, loss_b, rng_b) = results
    assert "query_blocks" not in out_a and "query_blocks" not in out_b
    assert torch.equal(out_a["pred_logits"], out_b["pred_logits"])
    assert torch.equal(out_a["pred_boxes"], out_b["pred_boxes"])
    assert loss_a.keys() == loss_b.keys() and all(torch.equal(loss_a[k], loss_b[k]) for k in loss_a)
    assert torch.equal(rng_a, rng_b)


def test_dn_draws_only_its_noise_from_the_random_stream():
    """With DN on (dropout 0) a training forward pass consumes exactly the DN noise draws."""
    model, _, _ = dn_forward("dab")
    images, masks, targets = make_batch()
    torch.manual_seed(5)
    model(images, masks, targets)
    after_forward = torch.get_rng_state()
    torch.manual_seed(5)
    labels = torch.cat([t["labels"] for t in targets]).repeat(3)
    model.plugins["dn"].noise(labels, torch.cat([t["boxes"] for t in targets]).repeat(3, 1))
    assert torch.equal(after_forward, torch.get_rng_state())


@pytest.mark.parametrize("name", NAMES)
def test_masked_dn_queries_do_not_change_the_matching_part(name):
    images, masks, targets = make_batch()
    for attn_mask in (True, False):
        model = build(name, DNConfig(groups=3, attn_mask=attn_mask), dec_layers=3).train()  # dropout 0
        with_dn, without_dn = model(images, masks, targets), model(images, masks)
        assert "query_blocks" in with_dn and "query_blocks" not in without_dn
        layers = [(a["pred_logits"], b["pred_logits"]) for a, b in zip(with_dn["aux_outputs"],
                                                                          without_dn["aux_outputs"])]
        layers += [(with_dn[key], without_dn[key]) for key in ("pred_logits", "pred_boxes")]
        same = all(torch.allclose(a, b, atol=1e-5) for a, b in layers)
        assert same == attn_mask, f"attn_mask={attn_mask}: matching outputs {'differ' if not same else 'equal'}"


@pytest.mark.parametrize("name", NAMES)
def test_no_dn_queries_at_inference(name):
    model = build(name, DNConfig(groups=3)).eval()
    images, masks, targets = make_batch()
    out = model(images, masks, targets)
    assert "query_blocks" not in out and out["pred_logits"].shape[1] == 10
    # the matching content still carries the "unknown" label embedding: same outputs as without targets
    assert torch.equal(out["pred_logits"], model(images, masks)["pred_logits"])


def test_dn_outputs_cover_every_layer():
    model, _, out = dn_forward("conditional")
    dn = dn_outputs(out)
    assert dn["logits"].shape == (2, 3, 9, NUM_CLASSES) and dn["pred_boxes"].shape == (2, 3, 9, 4)
    assert out["pred_logits"].shape == (3, 10, NUM_CLASSES)


def test_dn_losses_follow_aux_loss_setting():
    """Without aux outputs the DN loss, like the Hungarian loss, is computed at the last layer only."""
    model = build("dab", DNConfig(groups=2))
    model.cfg.aux_loss = False
    images, masks, targets = make_batch((2, 1, 0))
    losses = criterion_for(model)(model.train()(images, masks, targets), targets)
    assert sorted(losses) == ["dn_loss_bbox", "dn_loss_ce", "dn_loss_giou", "loss_bbox", "loss_ce", "loss_giou"]
