"""The spec's Hadamard transform (docs/quantization.md, "Hadamard transform").

d = m * p with p a power of two and m the smallest entry of SUPPORTED_M that makes d/m a power of
two. The transform is H_m (x) H_p applied to y viewed as [m, p] (index = a*p + i), normalized by
c = float32(1/sqrt(d)). The order of float32 operations is fixed so that every implementation gets
identical bits:

1. FWHT over p for each of the m rows: for h = 1, 2, ..., p/2, every pair (i, i+h) with (i & h) == 0
   becomes (a + b, a - b);
2. mixing across m: out[a] = (((s[a,0]*t[0]) + s[a,1]*t[1]) + ...) + s[a,m-1]*t[m-1], left to right,
   where s = H_m (entries +-1, so every product is exact);
3. h = float32(out * c).
"""

from __future__ import annotations

import functools

import torch

SUPPORTED_M = (1, 12, 20, 28)


def _conference(q: int, column_sign: int) -> torch.Tensor:
    """The (q+1)x(q+1) bordered Jacobsthal matrix: Q[i,j] = chi(j - i) (quadratic character mod the prime q),
    a border row of +1 and a border column of column_sign, zero diagonal."""
    residues = {(i * i) % q for i in range(1, q)}
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = column_sign
    for i in range(q):
        for j in range(q):
            a = (j - i) % q
            c[i + 1, j + 1] = 0 if a == 0 else (1 if a in residues else -1)
    return c


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I (q prime, q = 3 mod 4): H = I + C, C skew, order q + 1."""
    return _conference(q, -1) + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Paley construction II (q prime, q = 1 mod 4): C symmetric, each entry -> a 2x2 block, order 2(q + 1)."""
    s = _conference(q, 1)
    n = q + 1
    h = torch.zeros(2 * n, 2 * n, dtype=torch.int64)
    for i in range(n):
        for j in range(n):
            if s[i, j] == 0:
                blk = torch.tensor([[1, -1], [-1, -1]])
            else:
                blk = s[i, j] * torch.tensor([[1, 1], [1, -1]])
            h[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = blk
    return h


@functools.cache
def hadamard_m(m: int) -> torch.Tensor:
    """H_m as an int64 matrix of +-1 (m in SUPPORTED_M)."""
    if m == 1:
        h = torch.ones(1, 1, dtype=torch.int64)
    elif m == 12:
        h = _paley1(11)
    elif m == 20:
        h = _paley1(19)
    elif m == 28:
        h = _paley2(13)
    else:
        raise ValueError(f"no Hadamard matrix of order {m} in the spec (supported: {SUPPORTED_M})")
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64)), f"H_{m} is not Hadamard"
    return h


def factor(d: int) -> tuple[int, int]:
    """(m, p) with d = m * p, p a power of two, m the smallest supported order that works."""
    for m in SUPPORTED_M:
        if d % m == 0:
            p = d // m
            if p & (p - 1) == 0:
                return m, p
    raise ValueError(
        f"d_inner={d} has no Hadamard transform in the spec: it must be m * 2^k with m in {SUPPORTED_M}"
    )


def inv_sqrt(d: int) -> torch.Tensor:
    """c = float32(1 / sqrt(d)), computed in float64."""
    return torch.tensor(1.0 / (d**0.5), dtype=torch.float64).float()


def fwht_(x: torch.Tensor) -> torch.Tensor:
    """In-order unnormalized Walsh-Hadamard transform over the last dim (power of two), float32."""
    p = x.shape[-1]
    h = 1
    lead = x.shape[:-1]
    while h < p:
        v = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, p)
        h *= 2
    return x


def hadamard_transform(y: torch.Tensor) -> torch.Tensor:
    """Normalized spec Hadamard transform over the last dim of a float32 tensor."""
    d = y.shape[-1]
    m, p = factor(d)
    lead = y.shape[:-1]
    t = fwht_(y.float().reshape(*lead, m, p))
    if m > 1:
        s = hadamard_m(m).to(device=y.device, dtype=torch.float32)  # the small H_m is built on the CPU
        out = s[:, 0, None] * t[..., 0:1, :]
        for b in range(1, m):
            out = out + s[:, b, None] * t[..., b : b + 1, :]
        t = out
    return t.reshape(*lead, d) * inv_sqrt(d)


def hadamard_matrix(d: int) -> torch.Tensor:
    """The normalized d x d matrix Hn (float64, orthogonal) with hadamard_transform(y) ~= y @ Hn.T."""
    m, p = factor(d)
    hp = torch.ones(1, 1, dtype=torch.float64)
    while hp.shape[0] < p:
        hp = torch.cat([torch.cat([hp, hp], 1), torch.cat([hp, -hp], 1)], 0)
    return torch.kron(hadamard_m(m).double(), hp) / (d**0.5)
