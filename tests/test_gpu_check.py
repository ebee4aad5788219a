from scripts.gpu_check import check_backends, main


def test_gpu_check_dry_mode_runs_on_cpu(capsys):
    assert main(["--dry"]) == 0
    out = capsys.readouterr().out
    assert "scan backend fast" in out and "GPU check: PASS" in out and "latency 3D" in out
    assert "scan backend chunked" in out and "scan latency chunked" in out


def test_backend_check_detects_a_wrong_backend(monkeypatch):
    import scripts.gpu_check as gpu_check

    def broken(*args):
        return gpu_check.BACKENDS["reference"](*args) * 1.01

    monkeypatch.setitem(gpu_check.BACKENDS, "fast", broken)
    import torch

    assert check_backends(torch.device("cpu"), length=16) is False
