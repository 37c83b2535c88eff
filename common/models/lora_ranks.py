"""Sites of different LoRA ranks in one federation: truncation, zero padding, SVD re-factorisation.

The global adapter has rank ``lora.rank`` (r_max). A site of rank r_i <= r_max trains the
global adapter's first r_i components (rows of A, columns of B) and sends back the global
adapter with only those replaced: its update is zero in components >= r_i (HetLoRA's zero
padding, Cho et al. 2023). The server's mean, in the clear or under secure aggregation, is
then unchanged: a plain mean of equally shaped updates.

Under FFA-LoRA (A frozen and shared) the padded B-updates average exactly: mean_i(pad(dB_i))·A
is the mean of the sites' weight updates dB_i·A[:r_i]. When A is trained too, averaging factors
is not averaging products (as in plain FedAvg of LoRA); the server then re-factorises the global
adapter each round by SVD (:func:`refactorise_adapter`), so that truncating it to r_i components
keeps its best rank-r_i approximation (Eckart-Young), as FlexLoRA does (Bai et al. 2024), at
error ``sqrt(sum_{j >= r_i} sigma_j^2)`` (:func:`truncation_error`).

Pure numpy on the adapter tensors that travel (``common.models.lora.adapter_state``); the
peft layers themselves are resized by ``common.models.lora_resize``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_A, _B = "lora_A.weight", "lora_B.weight"


def is_lora_a(key: str) -> bool:
    return key.endswith(_A)


def is_lora_b(key: str) -> bool:
    return key.endswith(_B)


def effective_rank(requested: int, max_rank: int) -> int:
    """The rank a site trains at: ``requested`` (0: the server's ``max_rank``), never above ``max_rank``.

    A site's rank is a ceiling set by its compute; a site that could afford more than the
    federation's adapter holds trains the whole adapter.
    """
    if requested < 0:
        raise ValueError(f"a LoRA rank cannot be negative (got {requested})")
    return max_rank if requested == 0 else min(requested, max_rank)


def adapter_rank(state: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of an adapter state (every layer has the same); refuses a state without LoRA B."""
    ranks = {np.shape(v)[1] for k, v in state.items() if is_lora_b(k)}
    if len(ranks) != 1:
        raise ValueError(f"expected LoRA B matrices of one rank, found ranks {sorted(ranks)}")
    return int(ranks.pop())


def truncate_adapter(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` components of each LoRA layer (A's rows, B's columns); other tensors as they are."""
    if rank < 1:
        raise ValueError(f"a LoRA rank must be at least 1 (got {rank})")
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if is_lora_a(key):
            out[key] = np.array(value[:rank])
        elif is_lora_b(key):
            out[key] = np.array(value[:, :rank])
        else:
            out[key] = np.array(value)
    return out


def embed_adapter(
    site_state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The global adapter with a truncated site adapter's components put in place of its first ones.

    ``embed_adapter(s, g) - g`` is the site's update zero-padded to the global shapes: what it
    sends, plain or masked. Tensors other than LoRA's (a classification head) are the site's.
    """
    if set(site_state) != set(global_state):
        missing, extra = sorted(set(global_state) - set(site_state)), sorted(set(site_state) - set(global_state))
        raise ValueError(f"site adapter does not match the global one: missing {missing[:3]}, unexpected {extra[:3]}")
    out: dict[str, np.ndarray] = {}
    for key, target in global_state.items():
        value, full = np.asarray(site_state[key]), np.array(target, copy=True)
        if is_lora_a(key):
            fits = value.ndim == 2 and value.shape[0] <= full.shape[0] and value.shape[1:] == full.shape[1:]
            if fits:
                full[: value.shape[0]] = value
        elif is_lora_b(key):
            fits = value.ndim == 2 and value.shape[1] <= full.shape[1] and value.shape[0] == full.shape[0]
            if fits:
                full[:, : value.shape[1]] = value
        else:
            fits, full = value.shape == full.shape, np.array(value, copy=True)
        if not fits:
            raise ValueError(f"{key}: site tensor of shape {value.shape} does not fit the global {full.shape}")
        out[key] = full
    return out


def svd_refactorise(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B', A', sigma)`` with ``B'·A' = B·A``, ``B' = U·diag(sigma)``, ``A' = Vᵀ`` (orthonormal rows).

    The components come in order of singular value, so ``B'[:, :r]·A'[:r]`` is the best rank-r
    approximation of ``B·A`` (Eckart-Young). Through the QR factors of B and Aᵀ: only an r x r
    SVD, O((m + n)·r² + r³), never the m x n product. All of sigma sits on B and A keeps unit
    rows, as LoRA's B-zero/A-random start does: B's gradient does not shrink with ||B·A||,
    and a component of sigma 0 (zero column of B, unit row of A) still learns. Where the rank
    exceeds min(m, n), the extra components are zero in both factors.
    """
    m, r = b.shape
    if a.shape[0] != r:
        raise ValueError(f"LoRA factors do not chain: B is {b.shape}, A is {a.shape}")
    n = a.shape[1]
    q_b, r_b = np.linalg.qr(b.astype(np.float64))
    q_a, r_a = np.linalg.qr(a.T.astype(np.float64))
    u, sigma, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = sigma.shape[0]
    new_b, new_a, singular = np.zeros((m, r)), np.zeros((r, n)), np.zeros(r)
    new_b[:, :k] = (q_b @ u) * sigma
    new_a[:k] = vt @ q_a.T
    singular[:k] = sigma
    return new_b.astype(b.dtype), new_a.astype(a.dtype), singular


def refactorise_adapter(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every LoRA layer of ``state`` re-factorised by :func:`svd_refactorise`: same weight updates, same
    shapes, components ordered by singular value. For the server after each aggregated round when
    sites of lower rank train A (``lora.site_ranks`` without FFA). Not under FFA: A must stay the
    shared frozen one (and is not in the state)."""
    out = {k: np.array(v) for k, v in state.items()}
    for key in state:
        if is_lora_a(key):
            b_key = key[: -len(_A)] + _B
            if b_key not in state:
                raise ValueError(f"{key} has no matching {b_key}: SVD re-factorisation needs both LoRA factors")
            out[b_key], out[key], _ = svd_refactorise(np.asarray(state[b_key]), np.asarray(state[key]))
    return out


def truncation_error(singular_values: np.ndarray, rank: int) -> float:
    """||ΔW - ΔW_r||_F of the SVD-ordered truncation to ``rank`` components: the singular values' tail."""
    return float(np.sqrt(np.sum(np.square(np.asarray(singular_values, dtype=np.float64)[rank:]))))
