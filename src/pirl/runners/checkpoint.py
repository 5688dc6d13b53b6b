"""Checkpoints: atomic save, verified load, clear errors on corrupt or mismatched files.

A checkpoint is one ``torch.save`` file holding a dict with ``format`` (:data:`FORMAT`), the run's
config (as a dict), and whatever state the caller stores (model, sampler, optimizers, RNG states,
counters).  A SHA-256 of the file is written beside it (``.sha256``) and checked on load, so a
truncated or altered file is reported as corrupt instead of being half-loaded; a file without
its ``.sha256`` loads with a warning that its integrity cannot be checked.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

FORMAT = "pirl-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or made for another model/config."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``path`` (tmp file + rename) with its SHA-256 beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    digest = _sha256(tmp)
    os.replace(tmp, path)
    Path(str(path) + ".sha256").write_text(digest + "\n")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint; raise :class:`CheckpointError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sha = Path(str(path) + ".sha256")
    if sha.is_file():
        want = sha.read_text().strip()
        got = _sha256(path)
        if want != got:
            raise CheckpointError(f"checkpoint {path} is corrupt: SHA-256 {got[:12]}... does not "
                                  f"match the recorded {want[:12]}...")
    else:
        warnings.warn(f"checkpoint {path} has no {sha.name} beside it: its integrity cannot be "
                      "checked", stacklevel=2)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or not a pirl checkpoint: "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file "
                              f"(format={state.get('format') if isinstance(state, dict) else None!r})")
    return state


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                      allow_missing: Collection[str] = ()) -> list[str]:
    """``module.load_state_dict(state, strict=True)`` with an error naming the offending keys and
    shapes instead of a silent partial load.  Keys named in ``allow_missing`` may be absent from
    the checkpoint (they keep the module's values); returns those that were."""
    own = module.state_dict()
    kept = sorted((set(own) - set(state)) & set(allow_missing))
    missing = sorted(set(own) - set(state) - set(kept))
    unexpected = sorted(set(state) - set(own))
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shape:
            parts.append("shape mismatch " + "; ".join(shape[:8]))
        raise CheckpointError(f"{what} does not match the checkpoint: " + ", ".join(parts))
    module.load_state_dict(state, strict=not kept)
    return kept
