"""Override keys are checked against the configs' ids (issue #24, item 1), for every config family.

The fuzz test mutates real ids (one deletion, one swap of neighbours, one substitution each, generated from a
fixed seed) and checks that every mutated key stops the run before anything is read or fused, with the real
id suggested; the command lines of the documentation must pass the same check.
"""

from __future__ import annotations

import random
import re
import shlex
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser, ConfigWorkflow
from reliability_helpers import BUNDLE_ROOT, CLASSIFICATION, LOGGING, MEAN, META, chain, files_under, good_pair

from scripts.cli import UnknownOverrideError, bundle_run_arguments, check_command_line, check_override_keys

MAIN = str(Path(sys.modules["monai"].__file__).parent / "bundle" / "__main__.py")  # argv[0] of `python -m monai.bundle`
C, K = BUNDLE_ROOT / "configs", CLASSIFICATION / "configs"
FAMILIES = {
    "inference": [C / "inference.json"],
    "inference_3d": [C / "inference.json", C / "inference_3d.json"],
    "evaluate": [C / "inference.json", C / "evaluate.json"],
    "evaluate_3d": [C / "inference.json", C / "inference_3d.json", C / "evaluate.json", C / "evaluate_3d.json"],
    "export": [C / "inference.json", C / "export.json"],
    "train": [C / "train.json"],
    "train_3d": [C / "train.json", C / "train_3d.json"],
    "multi_gpu_train": [C / "train.json", C / "multi_gpu_train.json"],
    "study": [K / "study.json"],
}
NESTED = ["train#trainer#max_epochs", "network_def#refine", "optimizer#lr", "classifier_def#block_inplanes"]


def _argv(files: list[Path], *args: str, command: str = "run") -> list[str]:
    return [MAIN, command, "--config_file", repr([str(f) for f in files]), *args]


def _merged(files: list[Path]) -> dict:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser.get()


def check_ok(config: dict, key: str) -> bool:
    try:
        check_override_keys(config, [key])
    except UnknownOverrideError:
        return False
    return True


def mutations(key: str, rng: random.Random) -> list[str]:
    """One deletion, one swap of neighbouring characters and one substitution in the last part of ``key``."""
    head, sep, last = key.rpartition("#")
    i, j, k = (rng.randrange(len(last)) for _ in range(3))
    j = min(j, len(last) - 2)
    letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz_" if c != last[k]])
    out = [
        last[:i] + last[i + 1 :],
        last[:j] + last[j + 1] + last[j] + last[j + 2 :],
        last[:k] + letter + last[k + 1 :],
    ]
    return [head + sep + m for m in out if m != last and m]


def _cases() -> list[tuple[str, str, str]]:
    """(family, real id, mutated id) for the top-level ids of every family and a few nested ones."""
    rng = random.Random(24)
    cases = []
    for family, files in FAMILIES.items():
        config = _merged(files)
        ids = sorted(k for k in config if not k.startswith("_") and len(k) > 3)
        ids += [n for n in NESTED if n.split("#")[0] in config]
        for real in ids:
            for typo in mutations(real, rng):
                cases.append((family, real, typo))
    return cases


CASES = _cases()


def test_the_fuzz_cases_cover_every_family() -> None:
    assert {f for f, _, _ in CASES} == set(FAMILIES) and len(CASES) > 500


def test_every_mutated_key_is_refused_with_the_real_id_suggested() -> None:
    suggested_other, accepted = [], []
    for family, real, typo in CASES:
        config = _merged(FAMILIES[family])
        if check_ok(config, typo):
            accepted.append((family, real, typo))  # the mutation is itself a real id or keyword
            continue
        try:
            check_command_line(_argv(FAMILIES[family], f"--{typo}", "1"))
        except UnknownOverrideError as e:
            assert f"--{typo}" in str(e) and "nothing was run" in str(e)
            if f"did you mean --{real}?" not in str(e):
                suggested_other.append((family, real, typo, re.findall(r"did you mean (--\S+)\?", str(e))))
        else:
            raise AssertionError(f"{family}: --{typo} was accepted")
    # a mutation may land on another real id (e.g. 'roi_size' -> 'roi_sie' is no id, but 'tasks' -> 'task' is one)
    assert len(accepted) <= len(CASES) // 50, accepted
    # the suggestion is the id the typo came from, but for a few typos closer to another id
    assert len(suggested_other) <= len(CASES) // 20, suggested_other


def _fusion_cases(n: int = 12) -> list[tuple[str, str, str]]:
    """``n`` of the inference cases (mutations that are no real id), spread over the ids."""
    config = _merged(FAMILIES["inference"])
    cases = [c for c in CASES if c[0] == "inference" and not check_ok(config, c[2])]
    return cases[:: max(1, len(cases) // n)][:n]


@pytest.mark.parametrize("family, real, typo", _fusion_cases(), ids=lambda x: str(x))
def test_a_mutated_key_never_fuses_the_samples(family: str, real: str, typo: str, tmp_path: Path, monkeypatch) -> None:
    """End to end in this process, as ``python -m monai.bundle run`` runs it: 'initialize' stops first, so neither
    the embedded samples nor the user's data are fused."""
    files = FAMILIES[family]
    data = tmp_path / "mine"
    good_pair(data / "CT-MRI")
    override = {"dataset_dir": str(data), "output_dir": str(tmp_path / "out"), "network_def": MEAN}
    typo = typo if typo not in override else f"{typo}x"
    argv = _argv(files, *[x for k, v in override.items() for x in (f"--{k}", str(v))], f"--{typo}", "1")
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # guard_run installs its hook: restored afterwards
    wf = ConfigWorkflow(
        config_file=[str(f) for f in files], meta_file=str(META), logging_file=str(LOGGING), workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT), **override, **{typo: 1},
    )  # fmt: skip
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    assert any(isinstance(e, UnknownOverrideError) for e in chain(err.value))
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize(
    "family, args",
    [
        ("inference", ["--network_def#features", "[4, 8, 16]", "--dataset-dir", "x", "--overwrite"]),
        ("inference", ["--network_def", "{'_target_': 'scripts.baselines.MeanFusion'}", "--load_pretrain=false"]),
        ("inference_3d", ["--network_def#refine", "true", "--preprocessing#transforms#4#upper", "99"]),
        ("evaluate", ["--clinicalfmamba_def#refine", "true", "--metrics", "['SD']", "--fail_on", "all"]),
        ("train", ["--train#trainer#max_epochs", "2", "--optimizer#params", "x", "--loss#w_intensity", "1"]),
        ("export", ["--network_def#features", "[4, 8, 16]"]),
        (
            "study",
            [
                "--fusion_overrides",
                "{}",
                "--classifier_def#block_inplanes",
                "[4, 8, 8, 8]",
                "--allow_untrained",
                "true",
            ],
        ),
        ("study", ["--external_dataset_dir", "x", "--classifiers", "['@radiomics']", "--cnn#epochs", "2"]),
    ],
)
def test_real_and_nested_ids_are_accepted(family: str, args: list[str]) -> None:
    check_command_line(_argv(FAMILIES[family], "--meta_file", "m.json", "--workflow_type", "infer", *args))


def test_a_keyword_the_component_does_not_take_is_refused() -> None:
    with pytest.raises(UnknownOverrideError, match=r"--network_def#refin \(did you mean --network_def#refine\?\)"):
        check_command_line(_argv(FAMILIES["inference"], "--network_def#refin", "true"))
    with pytest.raises(
        UnknownOverrideError, match=r"--train#trainer#max_epoch \(did you mean --train#trainer#max_epochs\?\)"
    ):
        check_command_line(_argv(FAMILIES["train"], "--train#trainer#max_epoch", "1"))
    export = _argv(
        FAMILIES["export"],
        "--filepath",
        "m.ts",
        "--ckpt_file",
        "m.pt",
        "--network_def#refin",
        "1",
        command="ckpt_export",
    )
    with pytest.raises(UnknownOverrideError, match=r"--network_def#refin \(did you mean --network_def#refine\?\)"):
        check_command_line(export)  # the export network passes **kwargs on to ClinicalFMamba


def test_command_lines_are_parsed_as_fire_parses_them(tmp_path: Path) -> None:
    args_file = tmp_path / "args.json"
    args_file.write_text('{"config_file": "configs/inference.json", "datset_dir": "x"}')
    parsed = bundle_run_arguments(
        [MAIN, "run", "training", "--args_file", str(args_file), "--a-b=1", "--flag", "--n", "-1"]
    )
    assert parsed == {
        "__command__": "run",
        "config_file": "configs/inference.json",
        "datset_dir": "x",
        "args_file": str(args_file),
        "a_b": "1",
        "flag": "True",
        "n": "-1",
    }
    assert bundle_run_arguments(["pytest", "run", "--x", "1"]) is None  # not `python -m monai.bundle`
    assert bundle_run_arguments([MAIN, "verify_metadata", "--x", "1"]) is None


def _documented_commands() -> list[tuple[Path, Path, list[str]]]:
    """(doc, folder the command runs in, argv) of every ``monai.bundle run|ckpt_export|onnx_export`` command in the
    documentation's code blocks."""
    docs = [
        BUNDLE_ROOT / "README.md",
        *sorted((BUNDLE_ROOT / "docs").glob("*.md")),
        CLASSIFICATION / "docs" / "README.md",
    ]
    docs += sorted((BUNDLE_ROOT / "training").glob("*/README.md"))
    found = []
    for doc in docs:
        cwd = CLASSIFICATION if CLASSIFICATION in doc.parents else BUNDLE_ROOT
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                words = shlex.split(command, comments=True) if "monai.bundle" in command else []
                if "monai.bundle" in words and words[words.index("monai.bundle") + 1] in (
                    "run",
                    "ckpt_export",
                    "onnx_export",
                ):
                    found.append((doc, cwd, [MAIN, *words[words.index("monai.bundle") + 1 :]]))
    return found


def _config_list(value: str) -> list[str]:
    import ast

    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return [value] if isinstance(value, str) else list(value)


def test_the_documented_command_lines_pass_the_check(monkeypatch) -> None:
    commands = _documented_commands()
    assert len(commands) >= 15
    for doc, cwd, argv in commands:
        files = _config_list(bundle_run_arguments(argv)["config_file"])
        monkeypatch.chdir(
            next((d for d in (cwd, BUNDLE_ROOT, CLASSIFICATION) if all((d / f).is_file() for f in files)), cwd)
        )
        try:
            check_command_line(argv)
        except UnknownOverrideError as e:
            raise AssertionError(f"{doc.name}: {' '.join(argv[1:])}: {e}") from e


def test_tracking_settings_are_overrides_only_with_tracking() -> None:
    """--tracking mlflow adds MONAI's MLflow settings (tracking_uri, experiment_name, ...) to the config ids."""
    uri = ["--tracking_uri", "sqlite:///runs/mlruns.db", "--experiment_name", "x"]
    check_command_line(_argv(FAMILIES["train"], "--tracking", "mlflow", *uri))
    with pytest.raises(UnknownOverrideError, match=r"--tracking_uri"):
        check_command_line(_argv(FAMILIES["train"], *uri))
    with pytest.raises(UnknownOverrideError, match=r"--tracking_ur\b"):
        check_command_line(_argv(FAMILIES["train"], "--tracking", "mlflow", "--tracking_ur", "sqlite:///x.db"))
