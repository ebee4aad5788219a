"""The release archive (``python -m scripts.release``): contents, checksum, and a round trip through
``monai.bundle download`` from a local HTTP server (127.0.0.1 only) to inference on the embedded samples."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, download_large_files
from PIL import Image

from scripts.release import BUNDLE_NAME, build_release, bundle_files, main

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_OUTPUTS = [
    "CT-MRI/34012_fused.png",
    "CT-MRI/34016_fused.png",
    "PET-MRI/30045_fused.png",
    "PET-MRI/30045_fused_y.png",
    "PET-MRI/30075_fused.png",
    "PET-MRI/30075_fused_y.png",
    "SPECT-MRI/3025_fused.png",
    "SPECT-MRI/3025_fused_y.png",
    "SPECT-MRI/40030_fused.png",
    "SPECT-MRI/40030_fused_y.png",
    "T1c-FLAIR/brats_2013_pat0001_1_z063_fused.nii.gz",
]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    return build_release(tmp_path_factory.mktemp("dist"))


@contextmanager
def _serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 and a free port; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the extracted bundle imports its own scripts
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same arithmetic as the repo's run in this process
    return env


def _names(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as z:
        return z.namelist()


def test_release_holds_the_bundle_and_nothing_else(release) -> None:
    zip_path, sum_path = release
    names = _names(zip_path)
    assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
    rel = {n[len(BUNDLE_NAME) + 1 :] for n in names}
    for needed in [
        "LICENSE",
        "metadata.json",
        "requirements.txt",
        "configs/inference.json",
        "configs/train.json",
        "configs/logging.conf",
        "configs/metadata.json",
        "docs/README.md",
        "docs/data_license.txt",
        "docs/data/harvard_pairs.csv",
        "docs/samples/CT-MRI/MRI/34012.png",
        "docs/samples/datalist.json",
        "scripts/__init__.py",
        "scripts/networks/clinicalfmamba.py",
        "scripts/ssm/native/scan_kernel.c",
        "scripts/ssm/native/scan_kernel.h",
        "scripts/ssm/native/scan_scalar.h",
        "scripts/prepare_harvard.py",
        "models/model.pt",
        "models/model_3d.pt",
    ]:
        assert needed in rel, needed
    top = {r.split("/")[0] for r in rel}
    assert top == {"LICENSE", "metadata.json", "requirements.txt", "configs", "docs", "scripts", "models"}
    assert not [r for r in rel if "__pycache__" in r or r.endswith((".pyc", ".so")) or "training_log" in r]
    digest, name = sum_path.read_text().split()
    version = json.loads((ROOT / "metadata.json").read_text())["version"]
    assert name == zip_path.name == f"{BUNDLE_NAME}_v{version}.zip"
    assert digest == hashlib.sha256(zip_path.read_bytes()).hexdigest()


def test_release_is_reproducible_and_never_overwrites(release, tmp_path: Path, capsys) -> None:
    zip_path, sum_path = release
    again, again_sum = build_release(tmp_path)
    assert again_sum.read_text().split()[0] == sum_path.read_text().split()[0]
    with pytest.raises(FileExistsError, match="already there; remove it or pass --overwrite true"):
        build_release(tmp_path)
    assert main(["--output", str(tmp_path)]) == 1
    assert "--overwrite true" in capsys.readouterr().err
    assert main(["--output", str(tmp_path), "--overwrite", "true"]) == 0


def test_bundle_files_without_git_skip_caches_and_refuse_links(tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    for rel in ["LICENSE", "configs/a.json", "scripts/x.py", "scripts/__pycache__/x.cpython-311.pyc", "scripts/y.pyc"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    assert bundle_files(root, ["LICENSE", "configs", "scripts"]) == ["LICENSE", "configs/a.json", "scripts/x.py"]
    with pytest.raises(FileNotFoundError, match="the release needs models"):
        bundle_files(root, ["LICENSE", "models"])
    (root / "configs" / "link.json").symlink_to(root / "configs" / "a.json")
    with pytest.raises(ValueError, match=r"symbolic links cannot ship in the release: configs/link\.json"):
        bundle_files(root, ["configs"])


def test_weights_url_release_lists_weights_with_sha256(tmp_path: Path, monkeypatch) -> None:
    dist = tmp_path / "dist"
    with _serve(ROOT / "models") as url:
        zip_path, _ = build_release(dist, weights_url=url)
        rel = [n.split("/", 1)[1] for n in _names(zip_path)]
        assert "large_files.yml" in rel and not [r for r in rel if r.endswith(".pt")]
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp_path)
            text = z.read(f"{BUNDLE_NAME}/large_files.yml").decode()
        digest = hashlib.sha256((ROOT / "models" / "model.pt").read_bytes()).hexdigest()
        assert f'url: "{url}/model.pt"' in text and f'hash_val: "{digest}"' in text
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        download_large_files(bundle_path=str(tmp_path / BUNDLE_NAME))  # fetches and checks each sha256
    for name in ("model.pt", "model_3d.pt"):
        assert (tmp_path / BUNDLE_NAME / "models" / name).read_bytes() == (ROOT / "models" / name).read_bytes()


def test_release_round_trip_download_and_fuse_the_samples(release, tmp_path: Path) -> None:
    """``monai.bundle download --url`` from 127.0.0.1, then inference from the extracted bundle = the repo's run."""
    zip_path, sum_path = release
    bundles = tmp_path / "bundles"
    with _serve(zip_path.parent) as url:
        cmd = [sys.executable, "-m", "monai.bundle", "download", "--name", BUNDLE_NAME]
        cmd += ["--url", f"{url}/{zip_path.name}", "--bundle_dir", str(bundles)]
        done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert hashlib.sha256((bundles / f"{BUNDLE_NAME}.zip").read_bytes()).hexdigest() == sum_path.read_text().split()[0]
    extracted = bundles / BUNDLE_NAME
    assert (extracted / "configs" / "inference.json").is_file() and not (extracted / "tests").exists()

    out = tmp_path / "fused_release"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=extracted, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == EXPECTED_OUTPUTS

    # the repo's own run on one grey, one colour and the NIfTI pair (the same code path for the others)
    samples = json.loads((ROOT / "docs" / "samples" / "datalist.json").read_text())["testing"]
    base = ROOT / "docs" / "samples"
    keep = ("34012", "30045", "brats_2013_pat0001_1_z063")
    subset = [dict(d, mri=str(base / d["mri"]), other=str(base / d["other"])) for d in samples if d["id"] in keep]
    ref = tmp_path / "fused_repo"
    wf = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        meta_file=str(ROOT / "configs" / "metadata.json"),
        logging_file=str(ROOT / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(ROOT),
        output_dir=str(ref),
        **{"datalist#source": subset},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    compared = sorted(str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file())
    assert compared == [n for n in EXPECTED_OUTPUTS if n.split("/")[1].split("_")[0] in ("34012", "30045", "brats")]
    for name in compared:
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(ref / name))), name
        else:
            a, b = nib.load(out / name), nib.load(ref / name)
            assert np.allclose(a.affine, b.affine) and np.array_equal(a.get_fdata(), b.get_fdata()), name
