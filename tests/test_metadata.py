"""Bundle metadata as MONAI reads it: required packages, eval_metrics from the records, real copies, the schema."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, verify_metadata

from scripts.bundle_metadata import (
    check_required_packages,
    eval_metrics_from_records,
    main,
    read_record,
    read_summary_table,
)

ROOT = Path(__file__).resolve().parents[1]
COMPANION = ROOT / "bundle" / "tumor_classification"
BUNDLES = [ROOT, COMPANION]
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"


def _read_meta(path: Path) -> ConfigParser:
    parser = ConfigParser()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated key (optional_packages_version) warns when it is renamed
        parser.read_meta(str(path))
    return parser


@pytest.mark.parametrize("bundle", BUNDLES, ids=["fusion", "companion"])
def test_monai_reads_the_runtime_packages_and_no_mamba_ssm(bundle: Path) -> None:
    meta = json.loads((bundle / "metadata.json").read_text())
    assert "optional_packages_version" not in meta
    required = _read_meta(bundle / "metadata.json").get("_meta_#required_packages_version")
    assert required == meta["required_packages_version"]
    assert {"pytorch-ignite", "scikit-learn", "einops"} <= set(required)
    assert not any("mamba" in name.lower() for name in required)


def test_required_packages_match_requirements_txt() -> None:
    meta = json.loads((ROOT / "metadata.json").read_text())
    assert check_required_packages(meta, ROOT / "requirements.txt") == []
    assert {"nibabel", "pydicom", "SimpleITK", "scipy", "fire", "pyyaml"} <= set(meta["required_packages_version"])


def test_companion_packages_are_runtime_requirements_of_the_fusion_bundle() -> None:
    meta = json.loads((COMPANION / "metadata.json").read_text())
    problems = check_required_packages(meta, ROOT / "requirements.txt")
    # the companion needs a subset of the fusion bundle's requirements: only "not listed" is acceptable
    assert [p for p in problems if "but not in required_packages_version" not in p] == []


def test_check_required_packages_names_each_problem(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("torch>=2\nmonai[fire]>=1.6\nnibabel>=5\neinops>=0.8  # comment\n")
    meta = {"required_packages_version": {"nibabel": "4.0.0", "mamba-ssm": "2.3"}, "optional_packages_version": {}}
    problems = check_required_packages(meta, req)
    assert "nibabel: metadata version 4.0.0 does not satisfy '>=5'" in problems
    assert "einops: in requirements.txt but not in required_packages_version" in problems
    assert "fire: in requirements.txt but not in required_packages_version" in problems
    assert "mamba-ssm: in required_packages_version but not a runtime requirement" in problems
    assert any(p.startswith("optional_packages_version") for p in problems)


def test_eval_metrics_are_the_records() -> None:
    meta = json.loads((ROOT / "metadata.json").read_text())
    metrics = meta["eval_metrics"]
    assert metrics == eval_metrics_from_records(metrics["source"], ROOT, metrics["data"])
    for profile, spec in metrics["source"].items():
        table = read_record(spec, ROOT)
        assert set(table) == {"CT-MRI", "PET-MRI", "SPECT-MRI", "all"}
        assert metrics[profile]["CT-MRI"] == table["CT-MRI"]
    assert set(metrics["cddfuse"]["all"]) == {"EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM"}
    assert 0 < metrics["cddfuse"]["PET-MRI"]["Qabf"] < 1


def test_read_summary_table_values_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "summary_default.md"
    good.write_text(
        "# report\n\n| item | definition |\n| --- | --- |\n| EN | entropy |\n\n"
        "| task | n | EN | Qabf |\n| --- | --- | ---: | ---: |\n"
        "| CT-MRI | 2 | 4.5 ± 0.1 | 0.650 ± 0.020 |\n| all | 2 | 4.5 ± 0.1 | 0.65 |\n\ntext\n"
    )
    assert read_summary_table(good) == {"CT-MRI": {"EN": 4.5, "Qabf": 0.65}, "all": {"EN": 4.5, "Qabf": 0.65}}
    missing = tmp_path / "notes.md"
    missing.write_text("| a | b |\n| --- | --- |\n| 1 | 2 |\n")
    with pytest.raises(ValueError, match=r"notes\.md: no '\| task \| n"):
        read_summary_table(missing)
    bad = tmp_path / "bad.md"
    bad.write_text("| task | n | EN |\n| --- | --- | --- |\n| CT-MRI | 2 | n/a |\n")
    with pytest.raises(ValueError, match=r"bad\.md: task 'CT-MRI', metric 'EN'"):
        read_summary_table(bad)


def test_read_record_takes_one_method_of_a_model_selection_summary(tmp_path: Path) -> None:
    methods = {
        "candidate_a": {"CT-MRI": {"n": 2, "Qabf": {"mean": 0.6, "std": 0.1}, "MI": {"mean": None, "std": None}}},
        "max": {"CT-MRI": {"n": 2, "Qabf": {"mean": 0.5, "std": 0.1}}},
    }
    # the layout scripts.model_selection writes
    record = {"split": "test", "profile": "cddfuse", "metrics": ["Qabf", "MI"], "methods": methods}
    (tmp_path / "summary_cddfuse.json").write_text(json.dumps(record))
    assert read_record("summary_cddfuse.json#candidate_a", tmp_path) == {"CT-MRI": {"Qabf": 0.6}}
    with pytest.raises(ValueError, match=r"summary_cddfuse\.json#METHOD, one of \['candidate_a', 'max'\]"):
        read_record("summary_cddfuse.json", tmp_path)


def test_check_command_passes_here_and_fails_on_stale_metadata(tmp_path: Path, capsys) -> None:
    assert main(["--check"]) == 0
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    for rel in ["requirements.txt", "metadata.json", "configs/metadata.json", *_record_files(ROOT)]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, root / rel)
    assert main(["--check", "--root", str(root)]) == 0
    meta = json.loads((root / "metadata.json").read_text())
    meta["eval_metrics"]["cddfuse"]["CT-MRI"]["Qabf"] = 0.9
    (root / "metadata.json").write_text(json.dumps(meta))
    assert main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "eval_metrics differ from the records" in err and "not a real, identical copy" in err
    assert main(["--root", str(root)]) == 0  # rewrite from the records: both copies agree again
    assert main(["--check", "--root", str(root)]) == 0
    # new weights, new records: named once, then --check and rewrites follow eval_metrics["source"]
    (root / "eval").mkdir()
    table = "| task | n | Qabf |\n| --- | --- | ---: |\n| all | 3 | 0.8 ± 0.1 |\n"
    (root / "eval" / "summary_cddfuse.md").write_text(table)
    assert main(["--root", str(root), "--records", "cddfuse=eval/summary_cddfuse.md", "--data", "three pairs"]) == 0
    assert main(["--check", "--root", str(root)]) == 0
    meta = json.loads((root / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert meta["source"] == {"cddfuse": "eval/summary_cddfuse.md"} and meta["data"] == "three pairs"
    assert meta["cddfuse"] == {"all": {"Qabf": 0.8}} and "clinicalfmamba" not in meta


def _record_files(root: Path) -> list[str]:
    sources = json.loads((root / "metadata.json").read_text())["eval_metrics"]["source"].values()
    return [spec.partition("#")[0] for spec in sources]


@pytest.mark.parametrize("bundle", BUNDLES, ids=["fusion", "companion"])
def test_metadata_copy_is_identical_and_real(bundle: Path) -> None:
    copy = bundle / "configs" / "metadata.json"
    assert not copy.is_symlink()
    assert copy.read_bytes() == (bundle / "metadata.json").read_bytes()


def test_no_symlinks_in_either_bundle() -> None:
    folders = ("configs", "docs", "scripts", "models", "bundle")
    links = [str(p.relative_to(ROOT)) for d in folders for p in (ROOT / d).rglob("*") if p.is_symlink()]
    links += [name for name in ("LICENSE", "metadata.json", "README.md") if (ROOT / name).is_symlink()]
    assert links == []
    if shutil.which("git") and (ROOT / ".git").exists():
        listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
        assert [ln for ln in listing.stdout.splitlines() if ln.startswith("120000")] == []


@pytest.mark.parametrize("bundle", BUNDLES, ids=["fusion", "companion"])
def test_verify_metadata_passes(bundle: Path) -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"schema not found at {SCHEMA} (CI has ../shared beside the clone)")
    verify_metadata(meta_file=str(bundle / "metadata.json"), filepath=str(SCHEMA))


def test_ckpt_export_writes_the_runtime_packages_into_model_ts(tmp_path: Path) -> None:
    """``monai.bundle ckpt_export`` copies the parsed metadata into the TorchScript file: no mamba-ssm there either."""
    import torch
    from monai.bundle import ckpt_export
    from monai.data import load_net_with_metadata

    from scripts.networks import ClinicalFMamba

    tiny = {"features": [8, 8, 16], "depth": 1, "decoder_depth": 1, "d_state": 4, "swap_d_state": 4}
    torch.manual_seed(0)
    shipped = json.loads((ROOT / "configs" / "inference.json").read_text())["network_def"]
    options = {k: shipped[k] for k in ("refine", "source_selection")}  # the shipped architecture, tiny widths
    net = ClinicalFMamba(spatial_dims=2, **options, **tiny)
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        key_in_ckpt="model",
        meta_file=str(ROOT / "metadata.json"),
        config_file=[str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "export.json")],
        use_trace=True,
        input_shape=[1, 2, 32, 32],
        bundle_root=str(ROOT),
        **{f"network_def#{k}": v for k, v in tiny.items()},
    )
    _, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    expected = json.loads((ROOT / "metadata.json").read_text())["required_packages_version"]
    assert meta["required_packages_version"] == expected
    assert "optional_packages_version" not in meta and "mamba-ssm" not in meta["required_packages_version"]
