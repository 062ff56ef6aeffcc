"""Paired ablation arms: two runs that differ only in an ablated setting and share a seed start from the same
weights (for every parameter both have), see the same batches with the same augmentation, and probe the same
images. This is what lets the analysis pair the arms seed by seed."""
from __future__ import annotations

import pytest
import torch

from dndetr.sampling import epoch_batches, make_loader
from dndetr.trainer import Trainer
from helpers import compose_config, tiny

# (experiment, model override, the two arms' ablated settings)
ABLATIONS = [
    ("study_dab", "model=dab", ["dn.groups=0"], ["dn.groups=5"]),
    ("study_dn_dab", "model=dab", ["dn.attn_mask=true"], ["dn.attn_mask=false"]),
    ("study_dn_dab", "model=detr", ["dn.groups=0"], ["dn.groups=5"]),
    ("study_dn_dab", "model=conditional", ["dn.groups=0"], ["dn.groups=5"]),
]


def build_arm(tmp_path, name, experiment, model, arm):
    overrides = tiny(tmp_path, f"experiment={experiment}", model, "trainer.seed=3", *arm)
    return Trainer(compose_config(overrides), tmp_path / name)


def first_epoch(trainer):
    """The first epoch's batches exactly as train_one_epoch draws them (order and augmented tensors)."""
    trainer.train_set.epoch = 0
    cfg = trainer.cfg
    batches = epoch_batches(len(trainer.train_set), cfg.data.batch_size, cfg.trainer.seed, 0, 0, 1)
    return batches, list(make_loader(trainer.train_set, batches, 0))


@pytest.mark.parametrize("experiment,model,arm_a,arm_b", ABLATIONS,
                         ids=["dab-groups", "dn_dab-mask", "detr-groups", "conditional-groups"])
def test_paired_arms_share_weights_data_and_probes(tmp_path, experiment, model, arm_a, arm_b):
    a = build_arm(tmp_path, "a", experiment, model, arm_a)
    b = build_arm(tmp_path, "b", experiment, model, arm_b)
    # the arms really differ in the ablated setting
    assert (a.cfg.dn.groups, a.cfg.dn.attn_mask) != (b.cfg.dn.groups, b.cfg.dn.attn_mask)

    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    shared = sorted(set(state_a) & set(state_b))
    assert len(shared) > 50  # the whole detector; only what the plug-in adds may be missing from one arm
    # (its own module, and for models whose positional query is not a box, the box query head it needs)
    plugin_only = ("plugins.", "box_query_proj.")
    assert all(key.startswith(plugin_only) for key in set(state_a) ^ set(state_b)), set(state_a) ^ set(state_b)
    different = [key for key in shared if not torch.equal(state_a[key], state_b[key])]
    assert not different, f"initial values differ between the arms: {different[:5]}"

    batches_a, loaded_a = first_epoch(a)
    batches_b, loaded_b = first_epoch(b)
    assert batches_a == batches_b
    for (images_a, masks_a, targets_a), (images_b, masks_b, targets_b) in zip(loaded_a, loaded_b, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(masks_a, masks_b)
        for t_a, t_b in zip(targets_a, targets_b, strict=True):
            assert torch.equal(t_a["image_id"], t_b["image_id"])
            assert torch.equal(t_a["boxes"], t_b["boxes"]) and torch.equal(t_a["labels"], t_b["labels"])

    probes = [[int(t.probe_set[i][1]["image_id"]) for i in range(len(t.probe_set))] for t in (a, b)]
    assert probes[0] == probes[1] and len(probes[0]) > 0


def test_seeds_do_change_the_initial_values(tmp_path):
    """The comparison above is not trivially true: another seed gives other weights."""
    one = Trainer(compose_config(tiny(tmp_path, "experiment=study_dab", "trainer.seed=3")), tmp_path / "one")
    two = Trainer(compose_config(tiny(tmp_path, "experiment=study_dab", "trainer.seed=4")), tmp_path / "two")
    state_one, state_two = one.model.state_dict(), two.model.state_dict()
    assert any(not torch.equal(state_one[k], state_two[k]) for k in state_one if state_one[k].is_floating_point())
