"""Build the release archive: a clean, model-zoo-style bundle zip that ``monai.bundle download`` fetches.

::

    python -m scripts.release --output dist/
    python -m scripts.release --output dist/ --weights_url https://example.org/clinicalfmamba/v0.2.1

writes ``dist/<name>_v<version>.zip`` and ``dist/<name>_v<version>.zip.sha256`` (``sha256sum`` format). The zip
holds one folder ``<name>/`` (as ``monai.bundle download --name <name> --url URL`` expects) with::

    LICENSE  metadata.json  requirements.txt
    configs/   every config, logging.conf and metadata.json (a copy of metadata.json)
    docs/      model card, data licence, figures, docs/samples (the default inference input), docs/data (split file)
    scripts/   the bundle's code, without caches or compiled files
    models/    model.pt, model_3d.pt -- or, with --weights_url, large_files.yml (URL and sha256 per file) instead

Tests, training logs, the companion bundle and the repository's history stay out. Files are taken from the
working tree, limited to what git tracks or would track (ignored files never ship); without git, every file
under the listed folders is taken. Entries are sorted and time-stamped 1980-01-01, so the same tree gives the
same archive and the same checksum. Existing outputs are never overwritten unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BUNDLE_NAME", "EXCLUDE", "INCLUDE", "build_release", "bundle_files", "large_files_yaml", "sha256sum"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_NAME = "clinicalfmamba_fusion"
INCLUDE = ("LICENSE", "metadata.json", "requirements.txt", "configs", "docs", "scripts", "models")
EXCLUDE = ("__pycache__", "*.pyc", "*.pyo", "*.so", ".pytest_cache", ".hypothesis", ".DS_Store", "*.log", "*.tmp")
WEIGHT_SUFFIXES = (".pt", ".pth", ".ts", ".onnx")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def sha256sum(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _excluded(rel: str) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in rel.split("/") for pattern in EXCLUDE)


def _git_files(root: Path, include: Iterable[str]) -> list[str] | None:
    """Tracked and not-ignored untracked files under ``include``, or None outside a git work tree."""
    if shutil.which("git") is None:
        return None
    probe = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    if probe.returncode != 0 or Path(probe.stdout.strip()).resolve() != root.resolve():
        return None
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *include],
        cwd=root,
        capture_output=True,
        check=True,
    )
    return [p for p in listing.stdout.decode().split("\0") if p and (root / p).is_file()]


def bundle_files(root: str | Path = BUNDLE_ROOT, include: Iterable[str] = INCLUDE) -> list[str]:
    """The files of the release, relative to ``root`` (``/``-separated, sorted).

    Raises:
        FileNotFoundError: when an included top-level entry is missing from ``root``.
        ValueError: when an included file is a symbolic link (archives hold real files only).
    """
    root = Path(root)
    include = tuple(include)
    missing = [name for name in include if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"{root}: the release needs {', '.join(missing)}, not found in the bundle root")
    files = _git_files(root, include)
    if files is None:
        files = []
        for name in include:
            path = root / name
            items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            files += [p.relative_to(root).as_posix() for p in items]
    links = [f for f in files if (root / f).is_symlink()]
    if links:
        raise ValueError(f"{root}: symbolic links cannot ship in the release: {', '.join(links)}")
    return sorted(f for f in set(files) if not _excluded(f))


def large_files_yaml(entries: list[tuple[str, str, str]]) -> str:
    """MONAI's ``large_files.yml`` (``python -m monai.bundle download_large_files``) for ``(path, url, sha256)``."""
    lines = ["large_files:"]
    for path, url, digest in entries:
        lines += [f'  - path: "{path}"', f'    url: "{url}"', f'    hash_val: "{digest}"', '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


def _write_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def build_release(
    output: str | Path,
    root: str | Path = BUNDLE_ROOT,
    name: str = BUNDLE_NAME,
    weights_url: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``<output>/<name>_v<version>.zip`` and its ``.sha256`` file; returns both paths.

    Args:
        output: folder of the archive (created if needed).
        root: bundle root to package.
        name: bundle name, the zip's top folder (``monai.bundle download --name``).
        weights_url: base URL the weights will be served from; the weight files then stay out of the zip and
            ``large_files.yml`` lists ``<weights_url>/<file name>`` with each file's sha256.
        overwrite: replace an existing archive of the same name.

    Raises:
        FileExistsError: when the archive or checksum file exists and ``overwrite`` is false.
    """
    root, output = Path(root), Path(output)
    version = json.loads((root / "metadata.json").read_text(encoding="utf-8"))["version"]
    zip_path = output / f"{name}_v{version}.zip"
    sum_path = output / f"{zip_path.name}.sha256"
    existing = [str(p) for p in (zip_path, sum_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)}: already there; remove it or pass --overwrite true")
    files = bundle_files(root)
    weights = [f for f in files if f.startswith("models/") and f.endswith(WEIGHT_SUFFIXES)]
    output.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(tmp, "w") as archive:
        for rel in files:
            if weights_url and rel in weights:
                continue
            _write_entry(archive, f"{name}/{rel}", (root / rel).read_bytes())
        if weights_url:
            entries = [(w, f"{weights_url.rstrip('/')}/{Path(w).name}", sha256sum(root / w)) for w in weights]
            _write_entry(archive, f"{name}/large_files.yml", large_files_yaml(entries).encode())
    tmp.replace(zip_path)
    sum_path.write_text(f"{sha256sum(zip_path)}  {zip_path.name}\n", encoding="utf-8")
    return zip_path, sum_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="dist", help="folder of the archive (default: dist)")
    parser.add_argument("--name", default=BUNDLE_NAME, help=f"bundle name, the zip's top folder ({BUNDLE_NAME})")
    parser.add_argument(
        "--weights_url", default=None, help="base URL of the weights: large_files.yml instead of .pt files in the zip"
    )
    parser.add_argument("--overwrite", default="false", choices=["true", "false"], help="replace an existing archive")
    args = parser.parse_args(argv)
    try:
        overwrite = args.overwrite == "true"
        zip_path, sum_path = build_release(args.output, BUNDLE_ROOT, args.name, args.weights_url, overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB)\n{sum_path}: {sum_path.read_text().split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
