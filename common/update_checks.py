"""Checks on adapter updates that need no sight of a single site's update.

Each site checks its own update (trained adapter minus the global adapter) before it leaves,
masked or not: finite values, the global adapter's names and shapes, and an L2 norm within
``train.max_update_norm`` (0: no norm bound). The server checks the same of the mean it applies,
the unmasked mean under secure aggregation or the plain mean: an example-weighted mean of
updates whose norms are each at most ``B`` has norm at most ``B`` (the triangle inequality),
so a mean above ``B`` means some update broke the bound. With secure aggregation off the
server also checks each site's update on its own.

Norms are compared with a relative slack of :data:`NORM_SLACK` (float32 rounding, and the
fixed-point rounding of secure aggregation, are far smaller), plus an absolute ``slack`` where
the caller knows a larger rounding error.

Every function returns ``None`` for an acceptable update, else the reason, to be logged or sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Relative slack on the norm bound, for float rounding between the site's and the server's sums.
NORM_SLACK = 1e-3


def l2_norm(update: Mapping[str, np.ndarray] | np.ndarray) -> float:
    """The L2 norm of an update (a vector, or named tensors taken together), in float64."""
    if isinstance(update, Mapping):
        return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in update.values())))
    return float(np.linalg.norm(np.asarray(update, dtype=np.float64).ravel()))


def norm_problem(norm: float, max_norm: float, slack: float = 0.0) -> str | None:
    """Why ``norm`` breaks the bound ``max_norm`` (0: no bound), or None."""
    if not np.isfinite(norm):
        return f"its L2 norm is {norm}"
    if max_norm > 0 and norm > max_norm * (1 + NORM_SLACK) + slack:
        return f"its L2 norm {norm:.6g} exceeds train.max_update_norm = {max_norm:g}"
    return None


def update_problem(
    update: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray], max_norm: float, slack: float = 0.0
) -> str | None:
    """Why ``update`` (named tensors) is unacceptable next to the adapter ``like``, or None.

    It must have ``like``'s tensor names and shapes, only finite values, and an L2 norm within
    ``max_norm`` (0: unbounded).
    """
    if set(update) != set(like):
        missing, extra = sorted(set(like) - set(update)), sorted(set(update) - set(like))
        return f"its tensor names differ from the global adapter's (missing {missing[:3]}, unexpected {extra[:3]})"
    for name in sorted(like):
        got, want = np.shape(update[name]), np.shape(like[name])
        if got != want:
            return f"tensor {name!r} has shape {got}, the global adapter's is {want}"
    for name in sorted(like):
        if not np.all(np.isfinite(update[name])):
            return f"tensor {name!r} contains NaN or infinity"
    return norm_problem(l2_norm(update), max_norm, slack)


def vector_problem(vector: np.ndarray, length: int, max_norm: float, slack: float = 0.0) -> str | None:
    """Why the flat update ``vector`` (the secure-aggregation layout) is unacceptable, or None."""
    if np.shape(vector) != (length,):
        return f"it has shape {np.shape(vector)}, expected ({length},)"
    if not np.all(np.isfinite(vector)):
        return "it contains NaN or infinity"
    return norm_problem(l2_norm(vector), max_norm, slack)


def adapter_update_problem(
    adapter: Mapping[str, np.ndarray], global_adapter: Mapping[str, np.ndarray], max_norm: float
) -> str | None:
    """Why the update ``adapter - global_adapter`` is unacceptable, or None: ``adapter`` must have the
    global adapter's names and shapes and finite values, and the difference a norm within ``max_norm``."""
    if (problem := update_problem(adapter, global_adapter, 0.0)) is not None:
        return problem
    delta = {k: np.asarray(adapter[k], dtype=np.float64) - np.asarray(global_adapter[k]) for k in global_adapter}
    return update_problem(delta, global_adapter, max_norm)
