"""``configs/train.json`` and ``configs/multi_gpu_train.json`` end to end with a tiny network on synthetic pairs.

A handful of 80 x 80 PNG pairs (grey CT-like and colour PET-like partners, so the Y-channel path runs) are
written to a temporary folder with a ``pairs.csv`` ``split`` column, as in the Harvard copy; training uses
64 x 64 crops of a tiny ClinicalFMamba. Covered: the workflow properties, a 3-epoch run (loss decreases,
checkpoints, best model, per-epoch log with validation metrics, TensorBoard), a run killed in the middle of an
epoch and resumed from the command line from its one ``resume.pt`` (bitwise equal to the uninterrupted run), the
fresh-run guard, the optimizer's parameter groups, the default Harvard split datalists, and the 2-process gloo
DistributedDataParallel run under ``torchrun``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TRAIN = BUNDLE_ROOT / "configs" / "train.json"
MULTI_GPU = BUNDLE_ROOT / "configs" / "multi_gpu_train.json"
META = BUNDLE_ROOT / "configs" / "metadata.json"
LOGGING = BUNDLE_ROOT / "configs" / "logging.conf"
TINY_NET = {
    "_target_": "scripts.networks.ClinicalFMamba",
    "spatial_dims": 2,
    "features": [8, 8, 16],
    "depth": 1,
    "decoder_depth": 1,
    "d_state": 4,
    "swap_d_state": 4,
}
EPOCHS = 3
TIMING_COLUMNS = ("epoch_seconds", "finished_at")


def _write_pairs(root: Path, size: int = 80) -> Path:
    """6 train + 2 val synthetic pairs (MRI-like disc; CT-like ring, or a colour PET-like partner)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    rows = []
    for i in range(8):
        cx, cy, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.2, 0.3)
        d = np.hypot(xx - cx, yy - cy)
        mri = np.clip(200 * (d < r) * (0.6 + 0.4 * np.cos(12 * xx + i)) + 20 * rng.random((size, size)), 0, 255)
        other = np.clip((np.abs(d - r) < 0.04) * 240.0 + 60 * (d < r * 0.5), 0, 255)
        colour = i in (2, 5, 7)
        task, folder = ("PET-MRI", "PET") if colour else ("CT-MRI", "CT")
        for sub in ("MRI", folder):
            (root / task / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mri.astype(np.uint8)).save(root / task / "MRI" / f"{i}.png")
        if colour:
            rgb = np.stack([other, 0.5 * other + 40 * (d < r), 255 - other], -1).clip(0, 255).astype(np.uint8)
            Image.fromarray(rgb, "RGB").save(root / task / folder / f"{i}.png")
        else:
            Image.fromarray(other.astype(np.uint8)).save(root / task / folder / f"{i}.png")
        rows.append(
            {
                "task": task,
                "pair_id": str(i),
                "mri": f"{task}/MRI/{i}.png",
                "other": f"{task}/{folder}/{i}.png",
                "split": "train" if i < 6 else "val",
            }
        )
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _overrides(data: Path, out: Path, **extra) -> dict:
    return {
        "bundle_root": str(BUNDLE_ROOT),
        "datalist": str(data),
        "output_dir": str(out),
        "network_def": TINY_NET,
        "patch_size": [64, 64],
        "batch_size": 2,
        "val_interval": 1,
        "learning_rate": 0.005,
        "train#trainer#max_epochs": EPOCHS,
        **extra,
    }


def _workflow(data: Path, out: Path, config_file=TRAIN, **extra) -> ConfigWorkflow:
    wf = ConfigWorkflow(
        config_file=str(config_file) if isinstance(config_file, Path) else config_file,
        meta_file=str(META),
        logging_file=str(LOGGING),
        workflow_type="train",
        **_overrides(data, out, **extra),
    )
    wf.initialize()
    return wf


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "training_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BUNDLE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same arithmetic as this process
    return env


def _args_file(path: Path, config_files: list[Path], data: Path, out: Path, **extra) -> Path:
    args = {
        "config_file": [str(c) for c in config_files],
        "meta_file": str(META),
        "logging_file": str(LOGGING),
        **_overrides(data, out, **extra),
    }
    path.write_text(json.dumps(args, indent=1))
    return path


def _causes(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _assert_same_state(a, b, where: str = "") -> None:
    """Nested checkpoint contents equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference_run(data: Path, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("reference")
    wf = _workflow(data, out)
    assert not wf.check_properties()
    wf.run()
    wf.finalize()
    return out


def test_train_writes_checkpoints_log_and_metrics(reference_run: Path) -> None:
    out = reference_run
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "resume.pt", "training_log.csv"} <= names
    assert not any(n.startswith("checkpoint_epoch") or n.endswith(".tmp") for n in names)  # one resume file
    assert any(n.startswith("events.out.tfevents") for n in names)

    rows = _rows(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    for r in rows:  # the terms are logged and add up to the loss with the paper's weights
        total = 2 * float(r["train_intensity"]) + 10 * float(r["train_gradient"]) + 5 * float(r["train_ssim"])
        assert total == pytest.approx(float(r["train_loss"]), rel=1e-5)
        for key in ("val_qabf", "val_loss", "val_ssim", "val_mi"):
            assert np.isfinite(float(r[key])), key
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.005) and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # cosine steps
    best = max(rows, key=lambda r: float(r["val_qabf"]))
    assert int(rows[-1]["best_epoch"]) == int(best["epoch"])

    ckpt = torch.load(out / "resume.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "validator", "best_saver"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == EPOCHS * 3 and ckpt["lr_scheduler"]["last_epoch"] == EPOCHS
    from scripts.networks import ClinicalFMamba

    net = ClinicalFMamba(**{k: v for k, v in TINY_NET.items() if k != "_target_"})
    best_state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(best_state)  # a plain state dict: what inference.json and MONAI Label load
    if int(best["epoch"]) == EPOCHS:
        _assert_same_state(best_state, ckpt["model"])
    with torch.no_grad():
        fused = net.eval()(torch.rand(1, 2, 80, 80))
    assert fused.shape == (1, 1, 80, 80) and 0 <= fused.min() and fused.max() <= 1


def test_resume_after_a_kill_is_bitwise_equal(data: Path, reference_run: Path, tmp_path: Path) -> None:
    """Kill the run in the middle of epoch 2, resume with ``--resume true`` from the command line."""
    out = tmp_path / "run"
    wf = _workflow(data, out)

    class Killed(Exception):
        pass

    def kill(engine):
        raise Killed()

    wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_COMPLETED(once=5), kill)
    with pytest.raises(Exception) as info:
        wf.run()
    assert any(isinstance(e, Killed) for e in _causes(info.value))
    killed = torch.load(out / "resume.pt", map_location="cpu", weights_only=True)
    assert killed["trainer"]["iteration"] == 3  # the end of epoch 1, the last finished one

    args = _args_file(tmp_path / "args.json", [TRAIN], data, out, resume=True)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--args_file", str(args)]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resuming from" in proc.stdout + proc.stderr
    command = (out / "command.txt").read_text().splitlines()
    assert command[-1].startswith("python -m monai.bundle run --args_file ") and str(args) in command[-1]

    for name in ("resume.pt", "model.pt"):
        expected = torch.load(reference_run / name, map_location="cpu", weights_only=True)
        got = torch.load(out / name, map_location="cpu", weights_only=True)
        _assert_same_state(expected, got, name)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]  # noqa: E731
    assert strip(_rows(out)) == strip(_rows(reference_run))


def test_fresh_run_refuses_a_folder_with_checkpoints(data: Path, reference_run: Path) -> None:
    with pytest.raises(Exception) as info:
        _workflow(data, reference_run)
    assert any(isinstance(e, FileExistsError) and "--resume true" in str(e) for e in _causes(info.value))


def test_resume_switches(data: Path, reference_run: Path, tmp_path: Path) -> None:
    # --resume true with nothing to resume from: a fresh start
    wf = _workflow(data, tmp_path / "empty", resume=True)
    assert wf.parser.get_parsed_content("resume_from") is None
    assert wf.parser.get_parsed_content("train#checkpoint_loader") is None
    # --resume true: the run's resume file
    wf = _workflow(data, reference_run, resume=True)
    assert Path(wf.parser.get_parsed_content("resume_from")).name == "resume.pt"
    # --resume_from PATH: that checkpoint, into another run folder
    path = str(reference_run / "resume.pt")
    wf = _workflow(data, tmp_path / "other", resume_from=path)
    assert wf.parser.get_parsed_content("train#checkpoint_loader").load_path == path


def test_init_weights_starts_from_given_weights(data: Path, reference_run: Path, tmp_path: Path) -> None:
    """--init_weights FILE: the network starts from FILE (fine-tuning); a resume ignores it."""
    trained = torch.load(reference_run / "model.pt", weights_only=True)
    fresh = _workflow(data, tmp_path / "fresh").parser.get_parsed_content("network").state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)  # the file differs from the init
    wf = _workflow(data, tmp_path / "finetune", init_weights=str(reference_run / "model.pt"))
    state = wf.parser.get_parsed_content("network").state_dict()
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k]) for k in trained)
    # resuming: the checkpoint's weights win, init_weights is not loaded
    wf = _workflow(data, reference_run, resume=True, init_weights=str(tmp_path / "missing.pt"))
    assert wf.parser.get_parsed_content("init_load") is None
    # a file that does not fit the network is a readable error naming it
    bad = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(Exception) as info:
        _workflow(data, tmp_path / "bad", init_weights=str(bad))
    assert any(isinstance(e, ValueError) and str(bad) in str(e) for e in _causes(info.value))


def test_default_datalists_follow_the_harvard_split(shared_data: Path) -> None:
    parser = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", bundle_root=str(BUNDLE_ROOT)).parser
    train, val = parser.get_parsed_content("train#datalist"), parser.get_parsed_content("validate#datalist")
    assert (len(train), len(val)) == (446, 89)
    assert {d["task"] for d in train} == {"CT-MRI", "PET-MRI", "SPECT-MRI"}
    assert not {(d["task"], d["id"]) for d in train} & {(d["task"], d["id"]) for d in val}
    parser = ConfigWorkflow(
        config_file=str(TRAIN), workflow_type="train", bundle_root=str(BUNDLE_ROOT), tasks=["CT-MRI"]
    ).parser
    assert (len(parser.get_parsed_content("train#datalist")), len(parser.get_parsed_content("validate#datalist"))) == (
        108,
        20,
    )


def test_multi_gpu_config_runs_two_gloo_processes(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = _args_file(tmp_path / "args.json", [TRAIN, MULTI_GPU], data, out, **{"train#trainer#max_epochs": 2})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "--args_file",
        str(args),
    ]
    env = _cli_env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    names = {p.name for p in out.iterdir()}
    assert {"model.pt", "resume.pt", "training_log.csv"} <= names
    # only rank 0 logs: one TensorBoard file for the trainer and one for the validator
    assert len([n for n in names if n.startswith("events.out.tfevents")]) == 2
    rows = _rows(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and all(np.isfinite(float(r["val_qabf"])) for r in rows)
    ckpt = torch.load(out / "resume.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # saved without the DDP wrapper
    # 6 training pairs over 2 ranks in batches of 2: 2 iterations per epoch and rank
    assert ckpt["trainer"]["iteration"] == 4


def test_latest_checkpoint_skips_a_truncated_file(tmp_path: Path) -> None:
    from scripts.training import check_run_dir, latest_checkpoint

    assert latest_checkpoint(tmp_path / "missing") is None and latest_checkpoint(tmp_path) is None
    check_run_dir(tmp_path)  # nothing to protect
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint_epoch=2.pt")
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint_epoch=10.pt")
    (tmp_path / "checkpoint_epoch=11.pt").write_bytes((tmp_path / "checkpoint_epoch=10.pt").read_bytes()[:50])
    (tmp_path / "model.pt").write_bytes(b"")  # not an epoch checkpoint
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=10.pt"  # newest readable, numeric order
    with pytest.raises(FileExistsError, match="--resume true"):
        check_run_dir(tmp_path)
    check_run_dir(tmp_path, resume_from=str(tmp_path / "checkpoint_epoch=10.pt"))
    # a resume.pt is ordered by the epoch stored in it; a truncated one falls back to the epoch checkpoints
    torch.save({"model": {}, "trainer": {"iteration": 36, "epoch_length": 3}}, tmp_path / "resume.pt")
    assert Path(latest_checkpoint(tmp_path)).name == "resume.pt"
    torch.save({"model": {}, "trainer": {"epoch": 9}}, tmp_path / "resume.pt")
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=10.pt"
    (tmp_path / "resume.pt").write_bytes(b"PK\x03\x04 cut short")
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=10.pt"


def test_parameter_groups_scale_the_selection_learning_rate(data: Path, tmp_path: Path) -> None:
    """train.json's lr_multipliers: the source-selection output learns at 10x; a network without it has one group."""
    net = {**TINY_NET, "refine": True, "source_selection": True}
    wf = _workflow(data, tmp_path / "a", network_def=net, lr_multipliers={"selection.": 10.0})
    network, optimizer = wf.parser.get_parsed_content("network"), wf.parser.get_parsed_content("optimizer")
    selection = {id(p) for p in network.selection.parameters()}
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.05])
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == selection
    assert len(optimizer.param_groups[0]["params"]) + len(selection) == len(list(network.parameters()))
    scheduler = wf.parser.get_parsed_content("lr_scheduler")
    assert scheduler.base_lrs == pytest.approx([0.005, 0.05])  # each group decays from its own rate
    wf = _workflow(
        data, tmp_path / "b", network_def={**TINY_NET, "source_selection": False}, lr_multipliers={"selection.": 10.0}
    )
    assert len(wf.parser.get_parsed_content("optimizer").param_groups) == 1


@pytest.mark.parametrize("overlay, refine", [("train_paper.json", False), ("train_refine.json", True)])
def test_candidate_overlays_build_the_protocol_networks(overlay: str, refine: bool) -> None:
    """The two candidates of docs/evaluation_protocol.md: (a) the published network, (b) with the refinement block;
    neither has the source-selection output, so the optimizer has one parameter group."""
    files = [str(TRAIN), str(BUNDLE_ROOT / "configs" / overlay)]
    parser = ConfigWorkflow(config_file=files, workflow_type="train", bundle_root=str(BUNDLE_ROOT)).parser
    net = parser.get_parsed_content("network_def")
    assert (net.refine is not None) == refine and net.selection is None
    assert parser.get_parsed_content("max_epochs") == 30 and parser.get_parsed_content("val_interval") == 2


def test_record_command_appends_a_shell_line_per_start(tmp_path: Path) -> None:
    import shlex

    from scripts.training import record_command

    argv = [os.path.join("x", "monai", "bundle", "__main__.py"), "run", "--config_file", "['a.json','b.json']"]
    record_command(tmp_path, argv + ["--output_dir", "my runs/$X"])
    record_command(tmp_path, argv + ["--resume", "true"])
    lines = (tmp_path / "command.txt").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("# ") and lines[2].startswith("# ")
    assert lines[1] == "python -m monai.bundle run --config_file \"['a.json','b.json']\" --output_dir 'my runs/$X'"
    assert shlex.split(lines[1])[4:] == ["--config_file", "['a.json','b.json']", "--output_dir", "my runs/$X"]
    assert lines[3].endswith("--resume true")
