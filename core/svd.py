"""Fast exact singular values and thin SVD of weight matrices, and re-weighting of their
spectrum (SPEC §2.3): the one SVD module of specreg, used by spectral regularization
(:mod:`plugins.regularizers.sr`) and by the spectral monitor (:mod:`core.spectral.measure`).

Spectral regularization (Liu et al. 2019, eq. 9-10) needs an exact SVD of every layer's weight
matrix, and the monitor records "all singular values of W_SN(W)" (Sec. II-C). The authors' code
calls a full SVD on the CPU; for the wide matrices of a discriminator (up to 1024 x 9216 for
``resnet128``) that is slow, because LAPACK also builds the huge square ``V``. Here a matrix
``A`` (``m x n``, ``r = min(m, n)``) is decomposed through its small Gram matrix ``A A^T`` (or
``A^T A`` when tall), formed and diagonalised in float64::

    A A^T = U diag(s^2) U^T        (eigh, r x r)       V = A^T U diag(1/s)

**The trust threshold.** Squaring the matrix squares its condition number: the Gram matrix's
eigenvalues carry an absolute error of about ``r * eps * s_1^2`` (``eps = 2.2e-16``), so a
singular value ``s_k`` computed this way is off by about ``r * eps / (2 (s_k / s_1)^2)``
relative. The Gram route is trusted for ``s_k >= TRUSTED * s_1`` only (``TRUSTED = 1e-3``: at
most ~1e-7 relative for the widest ``r = 1024`` of our architectures, the rounding of the float32
that weights and spectra records hold, and typically far less). Whenever a value that is asked for
is smaller (a rank-deficient or collapsed spectrum), LAPACK's SVD of the tall orientation is used
instead, exact everywhere. Both users apply this one rule: :func:`singular_values` (the monitor:
every value is asked for) and :class:`ThinSVD` (SR: only the directions it re-weights).

Re-weighting a spectrum never needs ``V`` itself: ``U diag(s') V^T = M A`` with the small
``M = U diag(s'/s) U^T``, and only the singular directions whose ratio ``s'_k/s_k`` differs from
the common factor ``alpha`` enter ``M``::

    dec = thin_svd(weight_matrix(W))               # float64 U, S (descending)
    new = dec.S.clone(); new[:i] = dec.S[0]       # static compensation, SPEC §2.1
    W.copy_(dec.respectrum(new / dec.S[0], alpha=1 / dec.S[0]).reshape_as(W))

    s = singular_values(weight_matrix(W))         # every value, float64, descending (CPU)
"""

from __future__ import annotations

import math

import torch

__all__ = ["ThinSVD", "thin_svd", "svd", "singular_values", "TRUSTED"]

#: the Gram route is trusted for singular values ``s_k >= TRUSTED * s_1``; LAPACK for smaller ones
#: (see the module docstring for the error bound behind this value).
TRUSTED = 1e-3
#: directions whose coefficient is below this (relative to the output's scale) are skipped.
_SKIP = 1e-7
#: the final product runs in float32 only while its rounding is amplified by at most this.
_FLOAT32_AMPLIFICATION = 16.0
#: Gram matrices are formed by row blocks of at least this many rows (upper triangle only).
_GRAM_BLOCK = 128


def _gram(a64: torch.Tensor) -> torch.Tensor:
    """The upper triangle of ``a a^T`` for a float64 ``[m, n]`` matrix with ``m <= n``, which is
    all :func:`torch.linalg.eigh` with ``UPLO="U"`` reads (the rest is left zero).

    Row blocks ``i <= j`` only: with 8 blocks, 36 of the 64 block products (BLAS ``syrk``
    would save as much, but its library would bring a second thread pool next to torch's).
    """
    m = a64.shape[0]
    parts = min(8, max(1, m // _GRAM_BLOCK))
    if parts == 1:
        return a64 @ a64.mT
    gram = a64.new_zeros(m, m)
    edges = [round(k * m / parts) for k in range(parts + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        torch.mm(a64[lo:hi], a64[lo:].mT, out=gram[lo:hi, lo:])
    return gram


def _trusted(values: torch.Tensor, indices: torch.Tensor | None = None) -> bool:
    """Whether the Gram route's ``values`` (descending) may be used at ``indices`` (default: all):
    every one of them ``>= TRUSTED * s_1``, and ``s_1 > 0``."""
    if len(values) == 0 or (indices is not None and len(indices) == 0):
        return True
    s1 = values[0]
    chosen = values if indices is None else values[indices]
    return bool(s1 > 0) and not bool((chosen < TRUSTED * s1).any())


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of a 2-D tensor, descending, float64 on the CPU, exact (the module's
    trust rule); NaN everywhere if the matrix holds a non-finite value.

    The Gram product runs on the matrix's device, its ``eigvalsh`` (``r x r``) on the CPU; several
    times faster than an SVD of the wide matrix. A spectrum reaching below ``TRUSTED * s_1``
    (a collapsed layer) is recomputed by LAPACK's ``svdvals``.
    """
    if matrix.ndim != 2:
        raise ValueError(f"singular_values needs a matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().to(torch.float64)
    small = a if a.shape[0] <= a.shape[1] else a.mT
    if small.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    if not bool(torch.isfinite(small).all()):
        return torch.full((small.shape[0],), math.nan, dtype=torch.float64)
    values = torch.linalg.eigvalsh(_gram(small).cpu(), UPLO="U").flip(0).clamp_min(0).sqrt()
    if _trusted(values):
        return values
    return torch.linalg.svdvals(small.cpu())


class ThinSVD:
    """``A = U diag(S) V^T`` of a 2-D tensor ``A`` (``U [m, r]``, ``S [r]`` descending,
    ``V [n, r]``, all float64 on ``A``'s device), computed lazily and exactly (see module doc).

    ``U``/``S``/``V`` come from the Gram matrix; :meth:`exact` switches to LAPACK's thin SVD
    (done automatically when a caller needs a direction with ``s_k < TRUSTED * s_1``).
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2:
            raise ValueError(f"thin_svd needs a matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix.detach()
        m, n = self.matrix.shape
        #: whether U (wide, m <= n) or V (tall) is the Gram matrix's eigenbasis.
        self.wide = m <= n
        self._a64 = self.matrix.to(torch.float64)
        small = self._a64 if self.wide else self._a64.mT
        lam, basis = torch.linalg.eigh(_gram(small), UPLO="U")
        self.S = lam.flip(0).clamp_min(0).sqrt()
        self._basis = basis.flip(1)  # eigenvectors of the Gram matrix, descending
        self._other: torch.Tensor | None = None  # the other side, computed on demand
        self.is_exact = False

    # -- the decomposition -----------------------------------------------------------------

    @property
    def U(self) -> torch.Tensor:
        return self._basis if self.wide else self._other_side()

    @property
    def V(self) -> torch.Tensor:
        return self._other_side() if self.wide else self._basis

    def _other_side(self) -> torch.Tensor:
        if self._other is None:
            self._ensure_reliable(torch.arange(len(self.S), device=self.S.device))
        if self._other is None:
            # A^T u_k / s_k (wide) or A v_k / s_k (tall)
            product = self._a64.mT @ self._basis if self.wide else self._a64 @ self._basis
            self._other = product / self.S
        return self._other

    def exact(self) -> "ThinSVD":
        """Replace the Gram-route decomposition with LAPACK's (tall orientation, float64)."""
        if not self.is_exact:
            tall = self._a64.mT if self.wide else self._a64
            left, values, right_h = torch.linalg.svd(tall, full_matrices=False)
            # wide: A^T = left diag(values) right_h, so U = right_h^T, V = left;
            # tall: A = left diag(values) right_h, so U = left, V = right_h^T. Either way the
            # basis (U if wide, V if tall) is right_h^T and the other side is left.
            self.S = values
            self._basis, self._other = right_h.mT, left
            self.is_exact = True
        return self

    def _ensure_reliable(self, indices: torch.Tensor) -> None:
        """Switch to LAPACK if any of these singular values is too small for the Gram route."""
        if not self.is_exact and not _trusted(self.S, indices):
            self.exact()

    def triplets(self, indices: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
        """``(U[:, k], S[k], V[:, k])`` for the given components, accurate to float64 precision
        even where they are tiny (LAPACK is used then)."""
        index = torch.arange(len(self.S), device=self.S.device)[indices]
        self._ensure_reliable(index)
        if self._other is None and len(index) == len(self.S):
            self._other_side()  # every direction: compute (and keep) the whole other side
        if self._other is None:
            side = self._basis[:, index]
            product = self._a64.mT @ side if self.wide else self._a64 @ side
            other = product / self.S[index]
            u, v = (side, other) if self.wide else (other, side)
            return u, self.S[index], v
        return self.U[:, index], self.S[index], self.V[:, index]

    # -- re-weighting ------------------------------------------------------------------------

    def respectrum(self, new_values: torch.Tensor, alpha: float | torch.Tensor = 1.0,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """``U diag(new_values) V^T`` in ``dtype`` (default: the matrix's dtype).

        ``alpha`` is the factor most singular values are scaled by (``new_k = alpha * s_k``):
        the result is computed as ``alpha A + sum_k (new_k - alpha s_k) u_k v_k^T`` over the
        other directions only, as one product with a small ``r x r`` matrix. Where such a
        direction has ``s_k = 0`` (rank-deficient matrix) its singular vectors are LAPACK's
        orthonormal completion: the SVD is not unique there.
        """
        dtype = dtype or self.matrix.dtype
        new = new_values.to(device=self.S.device, dtype=torch.float64)
        alpha = float(alpha)
        coef = new - alpha * self.S
        scale = max(abs(alpha) * float(self.S[0]), float(new.abs().max()), 1e-300)
        index = torch.nonzero(coef.abs() > _SKIP * scale).flatten()
        if len(index) == 0:
            return (alpha * self._a64).to(dtype)
        self._ensure_reliable(index)
        if self.is_exact:  # (possibly just switched: LAPACK's S)
            coef = new - alpha * self.S
            index = torch.nonzero(coef.abs() > _SKIP * scale).flatten()
            u, _, v = self.triplets(index)
            out = alpha * self._a64 + (u * coef[index]) @ v.mT
            return out.to(dtype)
        # M = alpha I + B diag(coef / s) B^T over the Gram eigenbasis B (U if wide, V if tall)
        basis = self._basis[:, index]
        factors = coef[index] / self.S[index]
        mixer = (basis * factors) @ basis.mT
        mixer.diagonal().add_(alpha)
        # rounding in the product is amplified by |M| |A| / |result|
        amplification = (float(factors.abs().max()) + abs(alpha)) * float(self.S[0]) / scale
        gemm = self.matrix.dtype if (self.matrix.dtype == torch.float32 and
                                     amplification <= _FLOAT32_AMPLIFICATION) else torch.float64
        a = self.matrix.to(gemm)
        out = mixer.to(gemm) @ a if self.wide else a @ mixer.to(gemm)
        return out.to(dtype)


def thin_svd(matrix: torch.Tensor) -> ThinSVD:
    """The lazily exact thin SVD of a 2-D tensor (see :class:`ThinSVD`)."""
    return ThinSVD(matrix)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` like ``torch.linalg.svd(matrix, full_matrices=False)``, in float64, with every
    direction exact (tiny singular values included)."""
    dec = ThinSVD(matrix)
    u, s, v = dec.triplets(slice(None))
    return u, s, v.mT

