"""Building the compiled kernels (scripts/ssm/native): compiler, cache, OpenMP, -march targets, the self-check, and
the clean fallback to the ``fast`` scan when any of it fails."""

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from native_testing import detached, needs_kernel
from scan_testing import make_inputs

from scripts.ssm import (
    ENV_VAR,
    compiled_backend,
    compiled_scan_available,
    compiled_scan_info,
    resolve_backend,
    selective_scan,
    selective_scan_compiled,
    selective_scan_fast,
    selective_scan_time_major,
    set_scan_backend,
)
from scripts.ssm.native import build, loader, ops
from scripts.ssm.native.loader import kernel_library


def test_kernel_builds_where_a_c_compiler_exists():
    # keeps a broken build or self-check from turning every kernel test above into a silent skip
    # (without a compiler the fast backend serves: tested by the fallback tests below)
    assert build.find_compiler() is None or compiled_scan_available(), compiled_scan_info()["error"]
    info = compiled_scan_info()
    if info["available"]:  # the vector width follows the instruction set (16 floats only with 512-bit registers)
        widths = {"AVX-512": 16, "AVX2+FMA": 8, "AVX": 8, "SSE2": 4, "NEON": 4, "generic": 4}
        assert widths.get(info["isa"]) == info["simd_width"], info


@needs_kernel
def test_openmp_build_runs_on_torch_runtime():
    # on Linux with PyTorch's OpenMP backend (the PyPI CPU wheels) the kernel is built with -fopenmp and binds
    # to the libgomp.so.1 that PyTorch loaded: no second runtime appears
    info = compiled_scan_info()
    assert info["openmp"] == ("-fopenmp" in info["flags"])
    if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"], "the kernel was built without OpenMP next to PyTorch's OpenMP runtime"
    if info["openmp"]:
        assert kernel_library().cdll.scan_openmp() == 1
        assert len(build.libgomp_so1_runtimes()) == 1


@needs_kernel
def test_build_without_openmp_gives_the_same_numbers(monkeypatch):
    inputs = detached(make_inputs(2, 96, 200, 8, groups=3, dtype=torch.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        y_default = selective_scan_compiled(**inputs, delta_softplus=True)
        with loader.separate_build():
            monkeypatch.setenv(build.OPENMP_ENV_VAR, "0")  # Python thread pool instead
            info = compiled_scan_info()
            assert info["available"] and not info["openmp"] and "-fopenmp" not in info["flags"]
            y_pool = selective_scan_compiled(**inputs, delta_softplus=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y_default, y_pool)


@needs_kernel
def test_openmp_build_that_loads_a_second_runtime_is_not_used(monkeypatch, caplog):
    if not build.share_torch_openmp():
        pytest.skip("no OpenMP runtime of PyTorch's to share on this platform")
    calls = []

    def runtimes():  # a different runtime appears after the OpenMP build is loaded
        calls.append(1)
        return {"/torch/lib/libgomp.so.1"} if len(calls) <= 2 else {"/torch/lib/libgomp.so.1", "/usr/lib/libgomp.so.1"}

    monkeypatch.setattr(build, "loaded_openmp_runtimes", runtimes)
    with caplog.at_level(logging.INFO, logger="scripts.ssm.native.loader"), loader.separate_build():
        info = compiled_scan_info()
    assert info["available"] and not info["openmp"]
    assert any("second OpenMP runtime" in r.getMessage() for r in caplog.records)


@pytest.fixture
def broken_build(monkeypatch):
    """A fresh build state whose compiler call raises: the kernel is unavailable."""

    def fail(source, output, openmp=False):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(build, "compile_library", fail)
    with loader.separate_build():
        yield monkeypatch


def test_failed_build_warns_once_and_falls_back_to_fast(broken_build, caplog):
    inputs = detached(make_inputs(2, 8, 40, 4, groups=2))
    y_fast = selective_scan_fast(**inputs, delta_softplus=True)
    with caplog.at_level(logging.WARNING, logger="scripts.ssm.native.loader"):
        y1 = selective_scan(**inputs, delta_softplus=True, backend="compiled")
        y2 = selective_scan(**inputs, delta_softplus=True, backend="compiled")
    assert torch.equal(y1, y_fast) and torch.equal(y2, y_fast)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "simulated compiler failure" in warnings[0].getMessage()
    info = compiled_scan_info()
    assert not info["available"] and "simulated compiler failure" in info["error"]
    assert not compiled_backend.kernel_applicable(inputs["u"], n_state=4)


def test_failed_build_auto_resolves_to_fast(broken_build):
    broken_build.delenv(ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu") == "fast"
    # the time-major entry (the mixers') also falls back
    length, batch, groups, per_group, n_state = 20, 1, 2, 3, 4
    inputs = detached(make_inputs(batch, groups * per_group, length, n_state, groups=groups))

    def tm(x):
        return x.permute(2, 0, 1).reshape(length, batch, groups, per_group)

    args = (tm(inputs["u"]), tm(inputs["delta"]), inputs["A"].reshape(groups, per_group, n_state))
    args += (inputs["B"].permute(3, 0, 1, 2), inputs["C"].permute(3, 0, 1, 2))
    y_c = selective_scan_time_major(*args, delta_softplus=True, backend="compiled")
    y_f = selective_scan_time_major(*args, delta_softplus=True, backend="fast")
    assert torch.equal(y_c, y_f)


def test_missing_compiler_and_failed_self_check_fall_back(monkeypatch):
    with loader.separate_build():
        monkeypatch.setattr(build, "find_compiler", lambda: None)
        info = compiled_scan_info()
        assert not info["available"] and "no C compiler" in info["error"]
    # a kernel that builds but computes wrong numbers is rejected by the self-check
    monkeypatch.undo()
    if not compiled_scan_available():
        pytest.skip("no working C compiler here")
    real = ops.scan_time_major

    def wrong(*args, **kwargs):
        y, h = real(*args, **kwargs)
        return y * 1.01, h

    monkeypatch.setattr(ops, "scan_time_major", wrong)
    with loader.separate_build():
        info = compiled_scan_info()
    assert not info["available"] and "self-check of the scan failed" in info["error"]


@needs_kernel
def test_backend_selection_env_and_setter(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "compiled")
    assert resolve_backend(None, "cpu") == "compiled"
    monkeypatch.setenv(ENV_VAR, "fast")
    assert resolve_backend(None, "cpu") == "fast"
    set_scan_backend("compiled")
    try:
        assert resolve_backend(None, "cpu") == "compiled"
    finally:
        set_scan_backend(None)
    monkeypatch.delenv(ENV_VAR)
    assert resolve_backend("auto", "cpu") == "compiled"
    info = compiled_scan_info()
    assert info["available"] and info["seconds"] < build.COMPILE_TIMEOUT


def test_built_kernel_is_cached_for_later_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICALFMAMBA_KERNEL_CACHE", str(tmp_path / "cache"))
    if build.find_compiler() is None:
        assert not compiled_scan_available()  # nothing to cache without a compiler
        return
    with loader.separate_build():
        assert compiled_scan_available()  # built with the compiler, then stored
    entries = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert entries == [".json", ".so"] or entries == [".json", ".json", ".so", ".so"]  # OpenMP build (+ fallback)

    def no_compiler(*args, **kwargs):
        raise AssertionError("the compiler ran although the cache holds this build")

    monkeypatch.setattr(build.subprocess, "run", no_compiler)
    with loader.separate_build():
        assert compiled_scan_available()  # a later process: loaded from the cache, self-checked again
        y = selective_scan_compiled(**detached(make_inputs(1, 8, 20, 4)), delta_softplus=True)
    assert torch.isfinite(y).all()


def test_kernel_cache_key_and_switch(tmp_path, monkeypatch):
    if build.find_compiler() is None:
        return
    a, b = tmp_path / "a.c", tmp_path / "b.c"
    a.write_text("int f(void) { return 1; }")
    b.write_text("int f(void) { return 2; }")
    cc = build.find_compiler()
    assert build.cache_key(a, cc, False) != build.cache_key(b, cc, False)  # the source
    assert build.cache_key(a, cc, False) != build.cache_key(a, cc, True)  # the OpenMP choice
    assert build.cache_key(a, cc, False) != build.cache_key(a, cc, False, "x86-64-v3")  # the -march target
    assert build.cache_key(a, cc, False) == build.cache_key(a, cc, False)
    monkeypatch.setenv("CLINICALFMAMBA_KERNEL_CACHE", "0")
    assert build.kernel_cache_dir() is None
    monkeypatch.delenv("CLINICALFMAMBA_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.kernel_cache_dir() == tmp_path / "clinicalfmamba"
    # an unreadable entry is rebuilt, not trusted
    monkeypatch.setenv("CLINICALFMAMBA_KERNEL_CACHE", str(tmp_path / "c"))
    key = build.cache_key(a, cc, False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / f"scan_kernel_{key}.so").write_bytes(b"not a library")
    (tmp_path / "c" / f"scan_kernel_{key}.json").write_text("{broken")
    out = tmp_path / "out.so"
    build.compile_library(a, str(out))
    assert out.read_bytes() != b"not a library"


def test_kernel_self_check_passes_in_fresh_processes():
    # the first multi-threaded exp of a process could be off by 1e-9 on one thread (about 1 process in 12 before
    # warm_up_exp), failing the float64 self-check and silently disabling the kernel; several fresh processes catch it
    code = "import scripts.ssm.native.loader as c; print(c.compiled_scan_info()['error'])"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(6):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300
        )
        assert out.returncode == 0 and out.stdout.strip() == "None", out.stdout + out.stderr


def test_kernel_arch_comes_from_the_environment_and_is_checked(monkeypatch, caplog):
    monkeypatch.delenv(build.ARCH_ENV_VAR, raising=False)
    assert build.kernel_arch() == "native"
    monkeypatch.setenv(build.ARCH_ENV_VAR, " x86-64-v3 ")
    assert build.kernel_arch() == "x86-64-v3"
    monkeypatch.setenv(build.ARCH_ENV_VAR, "native -O0")  # one -march value, never extra flags
    with pytest.raises(ValueError, match=build.ARCH_ENV_VAR):
        build.kernel_arch()
    if build.find_compiler() is None:
        return
    with caplog.at_level(logging.WARNING, logger="scripts.ssm.native.loader"), loader.separate_build():
        info = compiled_scan_info()  # the build reports it and the fast scan runs
    assert not info["available"] and build.ARCH_ENV_VAR in info["error"]
    assert any(build.ARCH_ENV_VAR in r.getMessage() for r in caplog.records)


#: -march targets without AVX-512, the SIMD width (floats) and instruction set the kernels use there: the AVX2 and
#: SSE2 code paths, which this machine's default (native) build does not run when it has AVX-512
PORTABLE_TARGETS = {"x86-64-v3": (8, "AVX2+FMA"), "x86-64": (4, "SSE2")}


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 -march targets need an x86-64 CPU")
@pytest.mark.parametrize("arch", sorted(PORTABLE_TARGETS))
def test_portable_builds_pass_every_kernel_test(arch):
    # every kernel, backward, binding and build test, against the reference, with the kernels built for a CPU
    # without AVX-512 (in a fresh process: the build is once per process)
    root = Path(__file__).resolve().parents[2]
    code = (
        "import scripts.ssm.native.loader as c; i = c.compiled_scan_info(); "
        "print(i['available'], i['simd_width'], i['isa'], ' '.join(i['flags'] or []), i['error'])"
    )
    env = {**os.environ, "PYTHONPATH": str(root), build.ARCH_ENV_VAR: arch}
    info = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    available, width, isa, *flags = info.stdout.split()
    expected_width, expected_isa = PORTABLE_TARGETS[arch]
    assert available == "True" and f"-march={arch}" in flags, info.stdout + info.stderr
    assert (int(width), isa) == (expected_width, expected_isa), info.stdout
    files = [str(p.relative_to(root)) for p in sorted(Path(__file__).parent.glob("test_native_*.py"))]
    assert len(files) == 4, files
    select = "not portable_builds and not self_check_passes"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files, "-k", select],
        capture_output=True, text=True, env=env, cwd=root, timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
