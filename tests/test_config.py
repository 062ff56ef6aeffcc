"""Every option of every config group composes, validates and (models) builds; bad values stop `python train.py`
before training with one line naming the key, the value and what is allowed."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException

from dndetr.config import Config, ConfigError, register_configs
from dndetr.criterion import build_criterion
from dndetr.models import build_model
from helpers import CONF_DIR, REPO_ROOT, TINY, compose_config, run_train, tiny


def options(group: str) -> list:
    return sorted(path.stem for path in (REPO_ROOT / "conf" / group).glob("*.yaml"))


def test_every_group_has_the_documented_options():
    assert options("model") == ["conditional", "dab", "dab_deformable", "dab_deformable_enc", "deformable", "detr"]
    assert options("matcher") == ["detr", "focal", "stable_dino"]
    assert options("loss") == ["conditional", "dab", "deformable", "detr", "stable_dino"]
    assert options("dn") == ["default", "dino", "dn_detr"]
    assert options("group") == ["default", "group_detr"]
    assert options("hybrid") == ["default", "h_detr"]
    assert options("data") == ["coco", "synthetic"]
    assert options("hydra/launcher") == ["local", "slurm", "slurm_local"]
    assert {"cpu", "paper_12ep", "paper_coco"} <= set(options("experiment"))


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_and_builds(model):
    cfg = compose_config([f"model={model}", *TINY])
    assert cfg.model.name == model
    # Conditional and DAB train with focal loss, so their group file switches loss and matcher weights as well.
    assert cfg.loss.class_loss == ("ce" if model == "detr" else "focal")
    assert cfg.matcher.cost_class == (1.0 if model == "detr" else 2.0)
    built = build_model(cfg, 4)
    assert built.cfg.name == model
    assert sum(p.numel() for p in built.parameters()) > 0


@pytest.mark.parametrize("matcher, cost_class", [("detr", 1.0), ("focal", 2.0), ("stable_dino", 2.0)])
def test_every_matcher_composes(matcher, cost_class):
    cfg = compose_config(["model=detr", f"matcher={matcher}"])
    assert cfg.matcher.cost_class == cost_class and cfg.matcher.cost_bbox == 5.0


@pytest.mark.parametrize("loss", options("loss"))
def test_matcher_class_cost_follows_the_loss_by_construction(loss):
    """Any loss with any matcher: the matcher reads its class-cost type, alpha, gamma and GIoU epsilon from the
    loss group, so a focal loss can never be matched with a softmax cost (the old 'focal needs matcher=focal')."""
    cfg = compose_config(["model=dab", "matcher=detr", f"loss={loss}"])
    criterion = build_criterion(cfg, 4)
    assert criterion.matcher.loss is criterion.cfg is cfg.loss
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cost = criterion.matcher.class_cost(logits, torch.tensor([0]))
    expected = -logits.softmax(-1)[:, [0]] if cfg.loss.class_loss == "ce" else None
    if expected is not None:
        assert torch.allclose(cost, expected)
    else:
        p = logits.sigmoid()[0, 0]
        alpha, gamma = cfg.loss.focal_alpha, cfg.loss.focal_gamma
        focal = alpha * (1 - p) ** gamma * -(p + 1e-8).log() - (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
        assert torch.allclose(cost, focal.reshape(1, 1))


@pytest.mark.parametrize("dn, groups", [("default", 0), ("dn_detr", 5)])
def test_every_dn_option_composes(dn, groups):
    cfg = compose_config([f"dn={dn}"])
    assert cfg.dn.groups == groups and cfg.dn.lambda1 == cfg.dn.lambda2 == 0.4 and cfg.dn.label_noise == 0.2


def test_accelerator_options_compose():
    """DINO's CDN, Group DETR, H-DETR and Stable-DINO at their published values (docs/accelerators.md)."""
    cfg = compose_config(["model=dab", "dn=dino", "group=group_detr", "hybrid=h_detr", "loss=stable_dino",
                          "matcher=stable_dino"])
    assert (cfg.dn.contrastive, cfg.dn.num_queries, cfg.dn.groups, cfg.dn.label_noise, cfg.dn.box_noise) == (
        True, 100, 0, 0.5, 0.4)
    assert cfg.group.groups == 11 and (cfg.hybrid.queries, cfg.hybrid.k, cfg.hybrid.loss_weight) == (1500, 6, 1.0)
    assert (cfg.loss.class_loss, cfg.loss.weight_class, cfg.loss.weight_class_dn) == ("stable", 6.0, 1.0)
    assert cfg.matcher.position_beta == 0.5
    off = compose_config([])
    assert off.group.groups == 1 and off.hybrid.queries == 0 and off.dn.num_queries == 0
    assert not build_model(compose_config(["model=dab", *TINY]), 4).plugins


def test_data_options_compose(tmp_path):
    assert compose_config(["data=synthetic"]).data.name == "synthetic"
    cfg = compose_config(["data=coco", f"data.root={tmp_path}"])
    assert (cfg.data.name, cfg.data.root, cfg.data.train_split) == ("coco", str(tmp_path), "train2017")
    with pytest.raises(ConfigError, match=r"data.root='' is invalid: .*data=coco needs data.root"):
        compose_config(["data=coco"])  # no silent fall-back to the synthetic root


def test_optim_trainer_instability_defaults():
    cfg = compose_config([])
    assert isinstance(cfg, Config)
    assert cfg.optim.clip_max_norm == 0.1 and cfg.instability.enabled and cfg.trainer.resume


def experiment_overrides(name: str, tmp_path) -> list:
    needs_root = "paper_" in name and name != "paper_12ep"  # the paper settings train on COCO
    return [f"experiment={name}"] + ([f"data.root={tmp_path}"] if needs_root else [])


# experiment: (model, dn groups, data, backbone, epochs, lr drop)
EXPERIMENTS = {
    "cpu": ("conditional", 0, "synthetic", "resnet18", 16, 12),
    "cpu_study": ("conditional", 0, "synthetic", "resnet18", 48, 36),
    "study_detr": ("detr", 0, "synthetic", "resnet18", 48, 36),
    "study_dab": ("dab", 0, "synthetic", "resnet18", 48, 36),
    "study_dn_dab": ("dab", 5, "synthetic", "resnet18", 48, 36),
    "study_dn_dab_nomask": ("dab", 5, "synthetic", "resnet18", 48, 36),
    "study_cdn_dab": ("dab", 0, "synthetic", "resnet18", 48, 36),
    "study_group_dab": ("dab", 0, "synthetic", "resnet18", 48, 36),
    "study_group_dn_dab": ("dab", 5, "synthetic", "resnet18", 48, 36),
    "study_hybrid_dab": ("dab", 0, "synthetic", "resnet18", 48, 36),
    "study_stable_dn_dab": ("dab", 5, "synthetic", "resnet18", 48, 36),
    "paper_coco": ("conditional", 0, "coco", "resnet50", 50, 40),
    "paper_detr": ("detr", 0, "coco", "resnet50", 50, 40),
    "paper_conditional": ("conditional", 0, "coco", "resnet50", 50, 40),
    "paper_dab": ("dab", 0, "coco", "resnet50", 50, 40),
    "paper_dn_dab": ("dab", 5, "coco", "resnet50", 50, 40),
    "paper_12ep": ("conditional", 0, "synthetic", "resnet50", 12, 11),
    "[paper_dab,paper_12ep]": ("dab", 0, "coco", "resnet50", 12, 11),
    "[paper_dn_dab,paper_12ep]": ("dab", 5, "coco", "resnet50", 12, 11),
    "cpu_deformable": ("deformable", 0, "synthetic", "resnet18", 16, 12),
    "paper_deformable": ("deformable", 0, "coco", "resnet50", 50, 40),
    "paper_dn_deformable": ("dab_deformable_enc", 5, "coco", "resnet50", 50, 40),
    "[paper_dn_deformable,paper_12ep]": ("dab_deformable_enc", 5, "coco", "resnet50", 12, 11),
    "paper_dn_dab_deformable": ("dab_deformable", 5, "coco", "resnet50", 50, 40),
}


@pytest.mark.parametrize("experiment", sorted(set(options("experiment")) | set(EXPERIMENTS)))
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_config(experiment_overrides(experiment, tmp_path))
    assert experiment in EXPERIMENTS, f"add experiment {experiment} to the table above"
    assert (cfg.model.name, cfg.dn.groups, cfg.data.name, cfg.model.backbone.name, cfg.trainer.epochs,
            cfg.optim.lr_drop) == EXPERIMENTS[experiment]
    assert cfg.dn.attn_mask == (experiment != "study_dn_dab_nomask")
    # the CPU default job runs bf16 where the CPU has bf16 units; the recorded study and the paper settings fp32
    assert cfg.trainer.precision == ("auto" if experiment in ("cpu", "cpu_deformable") else "fp32")


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("study_")])
def test_study_models_build(experiment):
    build_model(compose_config([f"experiment={experiment}"]), 4)


def compose_with_hydra(overrides: list):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("launcher, target, partition", [
    ("slurm", "SlurmLauncher", None), ("slurm_local", "SlurmLauncher", "debug"), ("local", "LocalLauncher", None)])
def test_every_launcher_composes(launcher, target, partition):
    hydra_cfg = compose_with_hydra([f"hydra/launcher={launcher}"]).hydra
    assert hydra_cfg.launcher._target_.endswith(target)
    assert hydra_cfg.launcher.tasks_per_node >= 1
    if target == "SlurmLauncher":
        assert hydra_cfg.launcher.partition == partition


def test_paper_experiments_use_the_slurm_launcher(tmp_path):
    hydra_cfg = compose_with_hydra(experiment_overrides("paper_dn_dab", tmp_path)).hydra
    assert hydra_cfg.launcher._target_.endswith("SlurmLauncher") and hydra_cfg.launcher.gpus_per_node == 8


def test_launcher_through_the_command_line():
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--cfg", "hydra", "hydra/launcher=slurm_local"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "SlurmLauncher" in result.stdout and "partition: debug" in result.stdout


# -- bad values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["dn.groups=-1"], "dn.groups=-1 is invalid: must be an integer >= 0"),
    (["dn.box_noise=1.5"], "dn.box_noise=1.5 is invalid: must be in [0, 1)"),
    (["dn.center_shift=2.0"], "dn.center_shift=2.0 is invalid"),
    (["data.batch_size=0"], "data.batch_size=0 is invalid: must be >= 1"),
    (["matcher.cost_class=0", "matcher.cost_bbox=0", "matcher.cost_giou=0"], "at least one cost must be > 0"),
    (["model.hidden_dim=30", "model.nheads=4"], "model.hidden_dim=30 is invalid: must be divisible"),
    (["model.backbone.name=vgg"], "model.backbone.name='vgg' is invalid: must be one of resnet18"),
    (["trainer.epochs=0"], "trainer.epochs=0 is invalid"),
    (["optim.lr=0"], "optim.lr=0.0 is invalid: must be > 0"),
    (["instability.split=test"], "instability.split='test' is invalid: must be one of val, train"),
    (["+model.foo=1"], "model.foo=1 is invalid: no such key"),
    (["group.groups=0"], "group.groups=0 is invalid: must be an integer >= 1 (1 = off)"),
    (["hybrid.queries=-1"], "hybrid.queries=-1 is invalid: must be an integer >= 0"),
    (["hybrid.k=0"], "hybrid.k=0 is invalid: must be an integer >= 1"),
    (["dn.groups=5", "dn.num_queries=100"], "dn.num_queries=100 is invalid: must be 0 when dn.groups=5"),
    (["matcher.position_beta=-1"], "matcher.position_beta=-1.0 is invalid: must be >= 0"),
])
def test_bad_values_are_refused_in_process(overrides, expected):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


CLI_ERRORS = {
    "negative groups": (["dn.groups=-1"], ["dn.groups=-1", "integer >= 0"]),
    "box noise": (["dn.box_noise=1.5"], ["dn.box_noise=1.5", "[0, 1)"]),
    "wrong type": (["dn.label_noise=abc"], ["dn.label_noise=abc", "could not be converted to Float"]),
    "unknown model": (["model=unknown"], ["model=unknown", "must be one of conditional, dab, dab_deformable, dab_deformable_enc,"]),
    "all costs zero": (["matcher.cost_class=0", "matcher.cost_bbox=0", "matcher.cost_giou=0"],
                       ["matcher.cost_class", "(0.0, 0.0, 0.0)", "at least one cost must be > 0"]),
    "batch size": (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    "missing root": (["data=coco", "data.root=/nonexistent"], ["/nonexistent", "does not exist"]),
    "unknown key": (["model.foo=1"], ["model.foo=1", "not in 'ConditionalConfig'"]),
}


def assert_one_error_line(result: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit code 2, nothing on the terminal but one `error:` line on stderr, holding every expected piece."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_bad_config_stops_the_command_line_with_one_line(tmp_path, case):
    overrides, expected = CLI_ERRORS[case]
    run = tmp_path / "run"
    # The tiny settings keep a run that wrongly starts training short; the bad values come last and win.
    base = TINY if any(o.startswith("data=") for o in overrides) else tiny(tmp_path)
    result = run_train(run, base + ["trainer.epochs=1", *overrides], check=False, timeout=300)
    assert_one_error_line(result, *expected)
    assert result.stdout.strip() == ""  # not even a log line: it stopped before training
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoint_last.pt").exists()


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO_ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("override, expected", [
    ("dn.groups=[1", "error: dn.groups=[1 is invalid: no viable alternative at input '[1'"),
    ("dn.groups=1.5", "error: dn.groups=1.5 is invalid: Value '1.5' of type 'float' could not be converted to Integer"),
    ("trainer=fast", "error: trainer=fast is invalid: must be one of default"),
    ("model.backbone.depth=3", "error: model.backbone.depth=3 is invalid: Key 'depth' not in 'BackboneConfig'"),
])
def test_hydra_composition_errors_become_one_line(override, expected, monkeypatch):
    """train.py's rewording of Hydra's own errors (the command-line tests above run the same code end to end)."""
    script = load_train_script()
    monkeypatch.setattr(sys, "argv", ["train.py", override])
    with pytest.raises(CompactHydraException) as err:
        compose_with_hydra([override])
    assert "error: " + script.composition_error_line(err.value) == expected
