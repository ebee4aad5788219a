import pytest
import torch

from scripts.networks import ClinicalFMamba
from scripts.weights import load_network_weights, read_state_dict


class Payload:
    """A pickled object that is not a tensor."""


TINY = dict(features=(8, 8, 16), depth=1, decoder_depth=1, d_state=4, swap_d_state=4)


def test_round_trip_plain_and_checkpoint_dicts_and_ddp_prefix(tmp_path):
    src = ClinicalFMamba(**TINY)
    plain, ckpt = tmp_path / "plain.pt", tmp_path / "ckpt.pt"
    torch.save(src.state_dict(), plain)
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": torch.tensor(3)}, ckpt)
    for path in (plain, ckpt):
        dst = load_network_weights(ClinicalFMamba(**TINY), path)
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_weights_of_another_configuration_give_a_readable_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(ClinicalFMamba(**{**TINY, "features": (8, 8, 32)}).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"other\.pt do not match the configured ClinicalFMamba: .*other shapes"
    ) as err:
        load_network_weights(ClinicalFMamba(**TINY), path)
    assert "features" in str(err.value)


def test_missing_empty_truncated_and_pickled_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt is empty|weights file is empty"):
        read_state_dict(tmp_path / "empty.pt")
    good = tmp_path / "good.pt"
    torch.save(ClinicalFMamba(**TINY).state_dict(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt is not a readable PyTorch weights file"):
        read_state_dict(tmp_path / "cut.pt")

    # an arbitrary object: weights_only loading must refuse to unpickle it
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt is not a readable PyTorch weights file"):
        read_state_dict(tmp_path / "evil.pt")


def test_allow_missing_keeps_new_modules_and_still_refuses_real_mismatches(tmp_path):
    base, path = ClinicalFMamba(**TINY), tmp_path / "base.pt"
    torch.save(base.state_dict(), path)
    with pytest.raises(ValueError, match=r"tensors missing \(e\.g\. refine\."):
        load_network_weights(ClinicalFMamba(refine=True, **TINY), path)  # strict by default
    net = ClinicalFMamba(refine=True, **TINY)
    init = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("refine.")}
    load_network_weights(net, path, allow_missing=True)
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in init.items())  # the new module keeps its initialisation
    other = tmp_path / "other.pt"
    torch.save(ClinicalFMamba(**{**TINY, "features": (8, 8, 32)}).state_dict(), other)
    with pytest.raises(ValueError, match="other shapes"):
        load_network_weights(ClinicalFMamba(refine=True, **TINY), other, allow_missing=True)
