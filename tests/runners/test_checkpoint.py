"""Checkpoints: atomic save/load round trip, corrupt files and mismatched models are errors."""

import pytest
import torch

from pirl.runners.checkpoint import (CheckpointError, load_checkpoint, load_module_state,
                                     save_checkpoint)


def test_round_trip(tmp_path):
    m = torch.nn.Linear(3, 2)
    p = save_checkpoint(tmp_path / "c.pt", {"model": m.state_dict(), "step": 7})
    st = load_checkpoint(p)
    m2 = torch.nn.Linear(3, 2)
    load_module_state(m2, st["model"], "model")
    assert st["step"] == 7
    assert torch.equal(m2.weight, m.weight) and torch.equal(m2.bias, m.bias)


@pytest.mark.filterwarnings("ignore:.*integrity cannot be checked")
def test_corrupt_file_is_reported(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", {"model": torch.nn.Linear(3, 2).state_dict()})
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)
    # truncated, without a checksum file
    (tmp_path / "c.pt.sha256").unlink()
    p.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.filterwarnings("ignore:.*integrity cannot be checked")
def test_not_a_pirl_checkpoint(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a pirl"):
        load_checkpoint(tmp_path / "x.pt")


def test_mismatched_module_names_keys_and_shapes():
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    dst = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match=r"0\.weight: checkpoint \(4, 3\) vs model \(5, 3\)"):
        load_module_state(dst, src, "policy")
    src.pop("1.bias")
    with pytest.raises(CheckpointError, match=r"missing keys \['1\.bias'\]"):
        load_module_state(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)),
                          src, "policy")


def test_missing_checksum_file_loads_with_a_warning(tmp_path):
    """A checkpoint whose ``.sha256`` is gone still loads (an older copy, a file moved alone), but
    says that its integrity cannot be checked; with the file there, no warning."""
    import warnings

    m = torch.nn.Linear(3, 2)
    p = save_checkpoint(tmp_path / "c.pt", {"model": m.state_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(p)
    (tmp_path / "c.pt.sha256").unlink()
    with pytest.warns(UserWarning, match=r"c\.pt\.sha256.*integrity cannot be checked"):
        st = load_checkpoint(p)
    assert torch.equal(st["model"]["weight"], m.weight)
