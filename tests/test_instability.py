import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.optimize import linear_sum_assignment
from torch import nn

from dndetr import instability as inst

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# the metric


def test_assignment_vector_and_matched_costs():
    indices = (torch.tensor([3, 0]), torch.tensor([1, 0]))
    assign = inst.assignment_vector(indices, num_queries=5)
    assert assign.dtype == np.int16
    assert assign.tolist() == [0, -1, -1, 1, -1]
    cost_matrix = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    costs = inst.matched_costs(indices, cost_matrix)
    assert costs.dtype == np.float32
    assert costs[0] == 0.0 and costs[3] == 7.0  # cost_matrix[0, 0], cost_matrix[3, 1]
    assert np.isnan(costs[[1, 2, 4]]).all()


PREV = np.array([[0, 1, -1, -1], [-1, -1, 0, -1], [2, -1, 0, 1]], dtype=np.int16)
CURR = np.array([[1, 0, -1, -1],  # two queries swap their targets: 2 changes
                 [-1, 0, -1, -1],  # target 0 moves from query 2 (now unmatched) to query 1 (was unmatched): 2
                 [2, -1, 0, 1]], dtype=np.int16)  # identical: 0


def test_instability_hand_computed():
    assert inst.per_image_instability(PREV, CURR).tolist() == [2, 2, 0]
    assert inst.instability(PREV, CURR) == pytest.approx(4 / 3)
    assert inst.instability(PREV, PREV) == 0.0
    # ratio of means: (4/3) / (2 x mean(2, 1, 3))
    assert inst.normalised_instability(PREV, CURR, np.array([2, 1, 3])) == pytest.approx(1 / 3)
    assert np.isnan(inst.normalised_instability(PREV, CURR, np.zeros(3)))


def test_instability_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        inst.instability(PREV, CURR[:2])
    with pytest.raises(ValueError, match="num_objects"):
        inst.normalised_instability(PREV, CURR, np.array([1, 2]))


# ----------------------------------------------------------------------------------------------------------------
# storage


def record(assign_last, layers=(2,), image_ids=(11, 12, 13), num_objects=(2, 1, 3)):
    """Arrays for save_epoch; earlier layers get the last layer's assignment shifted by one query."""
    assign = np.stack([np.roll(assign_last, k, axis=-1) for k in range(len(layers) - 1, -1, -1)])
    cost = np.where(assign >= 0, 0.5, np.nan).astype(np.float32)
    return dict(image_ids=np.array(image_ids), assign=assign, cost=cost, num_objects=np.array(num_objects),
                layers=np.array(layers))


def test_save_load_roundtrip_and_list(tmp_path):
    arrays = record(PREV, layers=(0, 1, 2))
    path = inst.save_epoch(tmp_path, 3, **arrays)
    assert path == tmp_path / "matchings" / "epoch_0003.npz"
    loaded = inst.load_epoch(tmp_path, 3)
    assert loaded.assign.dtype == np.int16 and loaded.cost.dtype == np.float32
    assert loaded.image_ids.dtype == np.int64 and loaded.num_objects.dtype == np.int32
    assert loaded.layers.dtype == np.int64 and loaded.layers.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(loaded.assign, arrays["assign"])
    np.testing.assert_array_equal(loaded.cost, arrays["cost"])
    assert inst.load_epoch(tmp_path, 3, with_cost=False).cost is None
    (tmp_path / "matchings" / "epoch_0004.xyz.tmp").write_bytes(b"half a file")  # an interrupted write
    inst.save_epoch(tmp_path, 1, **arrays)
    assert inst.list_epochs(tmp_path) == [1, 3]
    assert inst.list_epochs(tmp_path / "nowhere") == []


def test_save_rejects_inconsistent_shapes(tmp_path):
    arrays = record(PREV)
    arrays["num_objects"] = np.array([1, 2])
    with pytest.raises(ValueError, match="num_objects"):
        inst.save_epoch(tmp_path, 0, **arrays)


def test_atomic_save_survives_crash(tmp_path, monkeypatch):
    inst.save_epoch(tmp_path, 0, **record(PREV))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        inst.save_epoch(tmp_path, 0, **record(CURR))
    monkeypatch.undo()
    np.testing.assert_array_equal(inst.load_epoch(tmp_path, 0).assign[-1], PREV)
    assert os.listdir(tmp_path / "matchings") == ["epoch_0000.npz"]  # the temporary file is gone


def test_load_reports_corrupt_file(tmp_path):
    (tmp_path / "matchings").mkdir()
    inst.epoch_path(tmp_path, 0).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="epoch_0000.npz: unreadable"):
        inst.load_epoch(tmp_path, 0)


def test_epoch_metrics_against_previous_recorded_epoch(tmp_path):
    inst.save_epoch(tmp_path, 0, **record(PREV, layers=(0, 1, 2)))
    inst.save_epoch(tmp_path, 2, **record(CURR, layers=(0, 1, 2)))  # every=2: epoch 2 compares with epoch 0
    assert inst.epoch_metrics(tmp_path, 0) == {}
    metrics = inst.epoch_metrics(tmp_path, 2)
    assert metrics["IS"] == pytest.approx(4 / 3)
    assert metrics["IS_norm"] == pytest.approx(1 / 3)
    # rolling the queries of both epochs the same way does not change how many differ
    assert metrics["IS_layer0"] == metrics["IS_layer1"] == metrics["IS_layer2"] == pytest.approx(4 / 3)
    series = inst.instability_series(tmp_path)
    assert series == [{"epoch": 2, **metrics}]


def test_epoch_metrics_last_layer_only(tmp_path):
    inst.save_epoch(tmp_path, 0, **record(PREV))
    inst.save_epoch(tmp_path, 1, **record(PREV))
    assert inst.epoch_metrics(tmp_path, 1) == {"IS": 0.0, "IS_norm": 0.0, "IS_layer2": 0.0}


def test_mismatched_image_ids_error_names_both_files(tmp_path):
    inst.save_epoch(tmp_path, 0, **record(PREV))
    inst.save_epoch(tmp_path, 1, **record(CURR, image_ids=(11, 12, 99)))
    with pytest.raises(ValueError) as info:
        inst.epoch_metrics(tmp_path, 1)
    message = str(info.value)
    assert "epoch_0000.npz" in message and "epoch_0001.npz" in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------------
# recording with a tiny fake model and a scipy matcher with the lead's matcher interface

NUM_QUERIES, NUM_CLASSES, NUM_LAYERS = 6, 3, 3


class FakeDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, NUM_QUERIES * (NUM_CLASSES + 4))
        self.dropout = nn.Dropout(0.5)  # consumes the RNG and changes outputs if run in train mode
        self.modes_seen = []

    def forward(self, images, masks, targets=None):
        self.modes_seen.append(self.training)
        features = self.dropout(images.mean(dim=(2, 3)))
        out = self.head(features).view(len(images), NUM_QUERIES, NUM_CLASSES + 4)
        layers = [{"pred_logits": out[..., :NUM_CLASSES] * (k + 1),
                   "pred_boxes": (out[..., NUM_CLASSES:] * (k + 1)).sigmoid()} for k in range(NUM_LAYERS)]
        return {**layers[-1], "aux_outputs": layers[:-1]}


class ScipyMatcher:
    def cost_matrices(self, outputs, targets):
        probs = outputs["pred_logits"].softmax(-1)
        return [torch.cdist(boxes, t["boxes"], p=1) - probs[i][:, t["labels"]]
                for i, (boxes, t) in enumerate(zip(outputs["pred_boxes"], targets))]

    def assign(self, costs):
        matches = [linear_sum_assignment(c.numpy()) for c in costs]
        return [(torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)) for q, t in matches]

    def __call__(self, outputs, targets):
        return self.assign(self.cost_matrices(outputs, targets))


def probe_loader():
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i, n in enumerate([2, 0, 4, 1, 3]):
        target = {"boxes": torch.rand(n, 4, generator=generator) * 0.5 + 0.25,
                  "labels": torch.randint(0, NUM_CLASSES, (n,), generator=generator),
                  "image_id": torch.tensor(100 + i)}
        samples.append((torch.rand(3, 8, 8, generator=generator), target))

    def collate(batch):
        images = torch.stack([image for image, _ in batch])
        return images, torch.zeros(len(batch), 8, 8, dtype=torch.bool), [t for _, t in batch]

    return torch.utils.data.DataLoader(samples, batch_size=2, shuffle=False, collate_fn=collate)


def test_record_matchings_all_layers():
    torch.manual_seed(0)
    model, loader, matcher = FakeDetector().train(), probe_loader(), ScipyMatcher()
    rng_before = torch.random.get_rng_state()
    image_ids, assign, cost, num_objects, layers = inst.record_matchings(model, loader, matcher, "cpu", all_layers=True)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert model.training and model.modes_seen == [False] * 3  # ran in eval mode, train mode restored
    assert image_ids.tolist() == [100, 101, 102, 103, 104]
    assert num_objects.tolist() == [2, 0, 4, 1, 3]
    assert layers.tolist() == [0, 1, 2]
    assert assign.shape == cost.shape == (3, 5, NUM_QUERIES) and assign.dtype == np.int16
    assert ((assign >= 0).sum(-1) == num_objects).all()  # every target matched exactly once per layer
    assert (np.isnan(cost) == (assign < 0)).all()
    # the last layer agrees with matching the model's outputs directly
    model.eval()
    with torch.no_grad():
        images, masks, targets = next(iter(loader))
        outputs = model(images, masks)
    (queries, target_idx), matrix = matcher(outputs, targets)[0], matcher.cost_matrices(outputs, targets)[0]
    assert assign[-1, 0, queries].tolist() == target_idx.tolist()
    np.testing.assert_allclose(cost[-1, 0, queries], matrix[queries, target_idx].numpy(), rtol=1e-6)


def test_record_matchings_deterministic_and_rng_neutral():
    model, matcher = FakeDetector(), ScipyMatcher()
    torch.manual_seed(1)
    first = inst.record_matchings(model, probe_loader(), matcher, "cpu", all_layers=False)
    after_recording = torch.rand(3)
    torch.manual_seed(1)
    second = inst.record_matchings(model, probe_loader(), matcher, "cpu", all_layers=False)
    torch.manual_seed(1)
    assert torch.equal(after_recording, torch.rand(3))  # training continues with the same random numbers
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert first[4].tolist() == [NUM_LAYERS - 1] and first[1].shape == (1, 5, NUM_QUERIES)


def test_dataloader_would_consume_rng_without_preservation():
    """Guards the point of preserved_rng: iterating a DataLoader draws from the global generator."""
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    list(probe_loader())
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_record_matchings_errors():
    model, matcher = FakeDetector(), ScipyMatcher()
    with pytest.raises(ValueError, match="aux_loss"):
        inst.record_matchings(model, probe_loader(), matcher, "cpu", all_layers=True, num_layers=6)
    with pytest.raises(ValueError, match="no images"):
        inst.record_matchings(model, [], matcher, "cpu")
    assert model.training


# ----------------------------------------------------------------------------------------------------------------
# the analysis script on a synthetic sweep


def load_analysis():
    spec = importlib.util.spec_from_file_location("instability_report", REPO / "analysis" / "instability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def write_run(job_dir, groups, seed, metrics=None, matchings=None, epochs=3, instability_enabled=True, job_id=None):
    (job_dir / ".hydra").mkdir(parents=True)
    if job_id is not None:  # the submitit job id Hydra's submitit launcher records in hydra.job.id
        (job_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"id": job_id}}}))
    overrides = ["model=dab", f"dn.groups={groups}", f"trainer.seed={seed}"]
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"model": {"name": "dab"}, "dn": {"groups": groups}, "trainer": {"epochs": epochs, "seed": seed},
              "instability": {"enabled": instability_enabled, "every": 1}}
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (job_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    for epoch, assign in (matchings or {}).items():
        inst.save_epoch(job_dir, epoch, **record(assign, image_ids=(1, 2), num_objects=(2, 1)))


def epoch_rows(aps, epoch_time, instab=None, instab_norm=None):
    rows = []
    for epoch, ap in enumerate(aps):
        row = {"epoch": epoch, "AP": ap, "epoch_time": epoch_time, "wall_time": epoch_time * (epoch + 1)}
        if instab is not None and epoch > 0:
            row.update(IS=instab[epoch - 1], IS_norm=instab_norm[epoch - 1])
        rows.append(row)
    return rows


def build_sweep(root):
    sweep = root / "multirun"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    # dn.groups=0: IS logged in metrics.jsonl; job 1 lacks the matchings of epoch 1
    write_run(sweep / "0", 0, 1, epoch_rows([0.1, 0.2, 0.30], 10, [10, 8], [0.5, 0.4]), instability_enabled=False)
    a = np.array([[0, 1, -1, -1], [0, -1, -1, -1]])
    write_run(sweep / "1", 0, 2, epoch_rows([0.1, 0.2, 0.32], 10, [12, 10], [0.6, 0.5]), matchings={0: a, 2: a})
    # dn.groups=5: no IS in metrics.jsonl, computed from the matchings
    swap = np.array([[1, 0, -1, -1], [0, -1, -1, -1]])  # 2 changes in image 0 -> IS 1
    swap_move = np.array([[1, 0, -1, -1], [-1, -1, -1, 0]])  # 2 + 2 changes -> IS 2
    write_run(sweep / "2", 5, 1, epoch_rows([0.2, 0.3, 0.40], 20), matchings={0: a, 1: swap, 2: swap})
    with open(sweep / "2" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "AP": 0.')  # a line cut short by a crash
    write_run(sweep / "3", 5, 2, epoch_rows([0.2, 0.3, 0.44], 20), matchings={0: a, 1: swap_move, 2: swap_move})
    # job 4 crashed before its first epoch ended; job 5 after two of three epochs
    write_run(sweep / "4", 5, 3)
    write_run(sweep / "5", 0, 3, epoch_rows([0.9, 0.9], 10, [1], [0.1]))
    # submitit's records of a job that raised (its log ends in the traceback submitit prints) and of one that
    # left no result
    job_logs = sweep / ".submitit" / "17"
    job_logs.mkdir(parents=True)
    (job_logs / "17_0_log.err").write_text(submitit_traceback("RuntimeError: CUDA out of memory"))
    with open(job_logs / "17_0_result.pkl", "wb") as f:
        pickle.dump(("error", "Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n"), f)
    (job_logs / "18_0_log.err").write_text("slurmstepd: error: *** JOB 18 CANCELLED ***\n")
    return sweep


def submitit_traceback(last_line):
    """What submitit writes to a job's *_log.err when the job's function raises."""
    return ("submitit ERROR (2026-01-01 12:00:00,000) - Submitted job triggered an exception\n"
            "Traceback (most recent call last):\n  File \"train.py\", line 1, in main\n    train(config)\n"
            f"{last_line}\n")


def test_analysis_report(tmp_path, capsys):
    sweep = build_sweep(tmp_path)
    out = tmp_path / "report"
    analysis = load_analysis()
    assert analysis.main([str(sweep), "--out", str(out)]) == 0

    for name in ("instability", "instability_norm", "ap_vs_epoch", "ap_vs_time"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, name
    summary = pd.read_csv(out / "summary.csv").set_index("setting")
    assert sorted(summary.index) == ["model=dab, dn.groups=0", "model=dab, dn.groups=5"]
    g0, g5 = summary.loc["model=dab, dn.groups=0"], summary.loc["model=dab, dn.groups=5"]
    assert (g0.n_seeds, g0.n_failed, g5.n_seeds, g5.n_failed) == (2, 1, 2, 1)
    assert g0.final_AP_mean == pytest.approx(0.31) and g5.final_AP_mean == pytest.approx(0.42)
    assert g5.final_AP_std == pytest.approx(np.std([0.40, 0.44], ddof=1))
    assert g0.IS_mean == pytest.approx(10.0)  # runs average 9 and 11 over epochs 1..2
    assert g0.IS_norm_mean == pytest.approx(0.5)
    assert g5.IS_mean == pytest.approx(0.75)  # from matchings: (1 + 0) / 2 and (2 + 0) / 2
    assert g5.IS_norm_mean == pytest.approx(0.25)  # IS / (2 x 1.5 objects)
    assert g0.epoch_time_mean == 10 and g5.epoch_time_mean == 20 and g0.epochs == 3
    markdown = (out / "summary.md").read_text()
    assert "| model=dab, dn.groups=5 | 2 | 1 | 3 | 42.0 ± 2.8 |" in markdown

    failures = (out / "failures.md").read_text()
    printed = capsys.readouterr().out
    for expected in (f"`{sweep / '4'}`: no metrics.jsonl", f"`{sweep / '5'}`: stopped after 2 of 3 epochs",
                     f"`{sweep / '1'}`: no matchings recorded for epochs 1..1", "CUDA out of memory",
                     "job 18_0 left no result", f"`{sweep / '2'}`: metrics.jsonl line 4 is not JSON"):
        assert expected in failures and expected in printed
    assert f"`{sweep / '0'}`" not in failures  # instability off: no matchings expected
    assert str(out) in printed


def test_analysis_from_epoch_and_default_out(tmp_path):
    sweep = build_sweep(tmp_path)
    assert load_analysis().main([str(tmp_path), "--from-epoch", "2"]) == 0  # finds the sweep below tmp_path
    summary = pd.read_csv(tmp_path / "instability_report" / "summary.csv").set_index("setting")
    assert summary.loc["model=dab, dn.groups=0", "IS_mean"] == pytest.approx(9.0)  # epoch 2 only: 8 and 10
    assert sweep.is_dir()


def test_analysis_exits_nonzero_without_readable_runs(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    write_run(sweep / "0", 0, 1)
    assert load_analysis().main([str(sweep), "--out", str(tmp_path / "report")]) == 1
    captured = capsys.readouterr()
    assert "no run with metrics" in captured.err and "no metrics.jsonl" in captured.out
    assert "no metrics.jsonl" in (tmp_path / "report" / "failures.md").read_text()


class CreatesFileWhenUnpickled:
    """A crafted submitit result: unpickling it calls open(path, "w"), i.e. runs code of the file's choosing."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_analysis_marks_run_of_failed_submitit_job_without_unpickling(tmp_path):
    sweep = tmp_path / "multirun"
    write_run(sweep / "0", 0, 1, epoch_rows([0.1, 0.2, 0.3], 10, [3, 2], [0.1, 0.1]), instability_enabled=False,
              job_id="5_1")
    write_run(sweep / "1", 0, 2, epoch_rows([0.1, 0.2, 0.4], 10, [3, 2], [0.1, 0.1]), instability_enabled=False,
              job_id="5_0")
    (sweep / ".submitit" / "5").mkdir(parents=True)
    (sweep / ".submitit" / "5" / "5_0_log.err").write_text(submitit_traceback("RuntimeError: boom"))
    # job 5_1 raised, was requeued (preempted) and then completed: not a failure
    (sweep / ".submitit" / "5" / "5_1_log.err").write_text(submitit_traceback("RuntimeError: preempted") +
                                                          "submitit INFO (...) - Job completed successfully\n")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(CreatesFileWhenUnpickled(marker))
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(tmp_path / "proof")))  # the payload does run when unpickled
    assert (tmp_path / "proof").exists()
    for job in ("5_0", "5_1"):
        (sweep / ".submitit" / "5" / f"{job}_result.pkl").write_bytes(payload)
    (sweep / ".submitit" / "5" / "5_submitted.pkl").write_bytes(payload)

    out = tmp_path / "report"
    assert load_analysis().main([str(sweep), "--out", str(out)]) == 0
    assert not marker.exists()  # nothing found in the sweep folder was executed
    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert (row.n_seeds, row.n_failed, row.final_AP_mean) == (1, 1, pytest.approx(0.3))
    assert f"`{sweep / '1'}`: submitit job 5_0 failed: RuntimeError: boom" in (out / "failures.md").read_text()
    assert "5_1" not in (out / "failures.md").read_text()  # a result and success after the traceback


def test_analysis_does_not_import_pickle():
    source = (REPO / "analysis" / "instability.py").read_text() + "".join(
        (REPO / "dndetr" / f"{name}.py").read_text() for name in ("runs", "report", "stats", "plots", "claims"))
    assert "import pickle" not in source and "pickle.load" not in source and "Unpickler" not in source


def test_one_epoch_plot_has_integer_epoch_ticks():
    from dndetr.plots import curve_figure

    one_epoch = pd.DataFrame({"mean": [0.3], "low": [float("nan")], "high": [float("nan")], "n": [1]}, index=[0])
    for epochs in ([0], [0, 1], list(range(40))):
        stats = pd.concat([one_epoch] * len(epochs)).set_axis(epochs)
        fig = curve_figure({"s": (np.array(epochs), stats)}, "epoch", "AP (%)", "t")
        ax = fig.axes[0]
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), (epochs, ticks)
        assert ax.get_legend().get_title().get_text() == "mean and 95 % CI over 1 seed"


def test_analysis_of_a_missing_folder_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "multirun" / "typo"
    assert load_analysis().main([str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: not a directory\n"
    assert not (tmp_path / "multirun").exists()
