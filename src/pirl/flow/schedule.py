"""The denoising time grid shared by all samplers (pi0 / openpi convention)."""

from __future__ import annotations

import torch


def time_grid(num_steps: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[K+1]`` times ``linspace(1, 1/K, K)`` followed by ``0`` (``t[0] = 1``, ``t[K] = 0``).

    ``dt_k = t[k] - t[k+1] = 1/K`` for every step; step ``k`` goes from ``t[k]`` to ``t[k+1]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    k = num_steps
    grid = torch.linspace(1.0, 1.0 / k, k, dtype=torch.float64)
    grid = torch.cat([grid, grid.new_zeros(1)])
    return grid.to(device=device, dtype=dtype)
