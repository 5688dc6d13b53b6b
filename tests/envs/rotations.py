"""Independent rotation formulas (float64) for checking the LIBERO adapter's and expert's."""

import numpy as np


def rodrigues(axis: np.ndarray, angle: float) -> np.ndarray:
    """The rotation matrix of ``angle`` about ``axis`` (Rodrigues' formula)."""
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def matrix_to_quat_xyzw(r: np.ndarray) -> np.ndarray:
    """Shepperd's method (independent of the axis-angle formula)."""
    tr = np.trace(r)
    if tr > 0:
        s = 2 * np.sqrt(tr + 1)
        return np.array([(r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s,
                         (r[1, 0] - r[0, 1]) / s, s / 4])
    i = int(np.argmax(np.diag(r)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = 2 * np.sqrt(1 + r[i, i] - r[j, j] - r[k, k])
    q = np.zeros(4)
    q[i] = s / 4
    q[j] = (r[j, i] + r[i, j]) / s
    q[k] = (r[k, i] + r[i, k]) / s
    q[3] = (r[k, j] - r[j, k]) / s
    return q
