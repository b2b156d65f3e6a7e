"""Semantic basis (docs/method.md, formula map §2): b_v = W⁺ e_v, the minimum-norm latent whose
logits are e_v.

With the unembedding W (V x d) of full column rank, W⁺ = (WᵀW)⁻¹ Wᵀ, so
b_v = G⁻¹ W_vᵀ with the Gram matrix G = WᵀW (d x d). Everything here is
d x d or d x n: the V x V projector W W⁺ is never formed and only the columns
asked for are solved.

G is accumulated in float64 over row chunks of W (no float64 copy of the whole
V x d matrix), a relative ridge `ridge · trace(G)/d` is added to the diagonal
and G is Cholesky-factored once per distinct W. The factor is cached in memory
(keyed by a fingerprint of W and the ridge) and optionally on disk
(`cache_dir`, one safetensors file per key), because the Gram product costs
2·V·d² float64 flops — seconds for a 135M model, minutes on CPU for 128k x 4096.
Solved columns are cached per token id too.

The fingerprint is sha256 over W's shape, dtype and a strided sample of at
most `_SAMPLE_ELEMS` of its values (as float32). Two different matrices that
agree on every sampled element would collide; for trained weight matrices
that does not happen in practice, and a changed model shape always changes
the key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import SalfError

_SAMPLE_ELEMS = 1 << 20          # values hashed for the fingerprint of W
_ROW_CHUNK = 8192                # rows of W converted to float64 at a time
_MAX_RIDGE_TRIES = 6             # ridge x10 per retry when Cholesky fails

# fingerprint+ridge -> {"chol": (d, d) float64 lower factor, "cols": {token_id: (d,) float64}}
_MEMORY_CACHE: dict[str, dict] = {}


def weight_fingerprint(W: torch.Tensor) -> str:
    """sha256 (hex) of W's shape, dtype and a strided sample of its values."""
    flat = W.detach().reshape(-1)
    stride = max(1, flat.numel() // _SAMPLE_ELEMS)
    sample = flat[::stride].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(W.shape)}|{W.dtype}|{stride}".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _work_device(W: torch.Tensor) -> torch.device:
    # float64 is unavailable on MPS (and slow or absent on some accelerators): use the CPU there.
    return W.device if W.device.type in ("cpu", "cuda") else torch.device("cpu")


def _gram(W: torch.Tensor) -> torch.Tensor:
    """G = WᵀW in float64, accumulated over row chunks."""
    dev = _work_device(W)
    d = W.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for start in range(0, W.shape[0], _ROW_CHUNK):
            chunk = W[start:start + _ROW_CHUNK].detach().to(device=dev, dtype=torch.float64)
            G.addmm_(chunk.T, chunk)
    return G


def _cholesky(G: torch.Tensor, ridge: float) -> torch.Tensor:
    d = G.shape[0]
    scale = float(torch.diagonal(G).mean())
    if not torch.isfinite(G).all() or scale <= 0:
        raise SalfError("unembedding matrix is zero or contains NaN/inf; cannot build the semantic basis")
    eye = torch.eye(d, dtype=G.dtype, device=G.device)
    r = ridge
    for _ in range(_MAX_RIDGE_TRIES):
        factor, info = torch.linalg.cholesky_ex(G + (r * scale) * eye)
        if int(info) == 0:
            return factor
        r = max(r * 10.0, 1e-12)
    raise SalfError(f"unembedding Gram matrix is not positive definite even with ridge {r:g}; "
                    "is the lm_head weight degenerate?")


def _cache_entry(W: torch.Tensor, ridge: float, cache_dir: str | os.PathLike | None) -> dict:
    key = f"{weight_fingerprint(W)[:32]}-r{ridge:g}"
    entry = _MEMORY_CACHE.get(key)
    if entry is not None:
        return entry
    dev = _work_device(W)
    chol = None
    path = Path(cache_dir) / f"basis-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path))["chol"]
            if loaded.shape == (W.shape[1], W.shape[1]) and loaded.dtype == torch.float64:
                chol = loaded.to(dev)
        except Exception:  # a corrupt cache file is rebuilt, not fatal
            chol = None
    if chol is None:
        chol = _cholesky(_gram(W), ridge)
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"chol": chol.cpu().contiguous()}, str(tmp))
            os.replace(tmp, path)
    entry = {"chol": chol, "cols": {}, "key": key}
    _MEMORY_CACHE[key] = entry
    return entry


def clear_cache() -> None:
    """Forget every in-memory factor and column (disk files are left alone)."""
    _MEMORY_CACHE.clear()


def semantic_basis(anat, token_ids, ridge: float = 1e-6, cache_dir: str | os.PathLike | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows b_v = G⁻¹ W_vᵀ for each id in `token_ids`: a tensor (len(token_ids), d).

    `anat` is an Anatomy (its `.unembedding` is used) or the matrix W itself.
    `ridge` is relative to the mean diagonal of G. Returned on W's device
    (CPU when W lives on a device without float64), in `dtype`.
    """
    W = anat if isinstance(anat, torch.Tensor) else anat.unembedding
    if W.dim() != 2:
        raise SalfError(f"unembedding must be a (V, d) matrix, got shape {tuple(W.shape)}")
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    V, d = W.shape
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise SalfError(f"token ids {bad[:5]} are outside the vocabulary (size {V})")
    if not ids:
        return torch.zeros(0, d, dtype=dtype, device=_work_device(W))
    # Cached tensors must be ordinary tensors even when called under inference_mode.
    with torch.inference_mode(False), torch.no_grad():
        entry = _cache_entry(W, ridge, cache_dir)
        cols: dict[int, torch.Tensor] = entry["cols"]
        missing = sorted({t for t in ids if t not in cols})
        if missing:
            chol = entry["chol"]
            rhs = W[missing].detach().to(device=chol.device, dtype=torch.float64).T  # (d, m)
            solved = torch.cholesky_solve(rhs, chol)                                # (d, m)
            for j, t in enumerate(missing):
                cols[t] = solved[:, j].clone()
        return torch.stack([cols[t] for t in ids]).to(dtype)
