"""Fitted Q/K rows for folded heads (fold_qk="fit"): the new head's scores reproduce the mean of its
group's scores on the example activations, by least squares.

Shape legend: N example tokens, Dq / Dk the Q / K projection input widths (+1 where the projection has
a bias), dh head size, G heads in the group.

Dense head i scores a query x_q and a key x_k as x_q A_i^T B_i x_k^T, with A_i [dh, Dq] the head's
rows of the Q projection ([W | b], x with a trailing 1 where there is a bias) and B_i those of K. The
group's mean score is the bilinear form M = mean_i A_i^T B_i [Dq, Dk], of rank up to G*dh; one head
gives rank dh. Over the example tokens X_q [N, Dq], X_k [N, Dk] the error || X_q (A^T B - M) X_k^T ||_F
equals || S_q (A^T B - M) S_k ||_F with S = (X^T X)^(1/2), so the best A, B are the top dh singular
triplets of S_q M S_k = U Sigma V^T (Eckart-Young): A = Sigma^(1/2) U^T S_q^-1, B = Sigma^(1/2) V S_k^-1.
A ridge of 1e-4 of the mean eigenvalue keeps S invertible where the examples span fewer directions
than D; with few example tokens the fit follows those tokens, so give representative examples. The
"mean" fold instead averages the rows, and (mean A)^T (mean B) is not the mean of the products.

Grouping by scores (fold_groups="similar"): the folded head computes one attention pattern for all of
its group's V/O experts, so heads whose scores on the examples agree lose least. With
X_i = S_q A_i^T B_i S_k (head i's scores in the whitened example space, || X_i ||_F = its scores'
norm on the tokens), the loss of a group g against its mean score is
sum_{i in g} || X_i - mean_g X ||^2 = sum_i K_ii - (1/G) sum_{i, j in g} K_ij, with the Gram matrix
K_ij = <X_i, X_j> = sum((P_i^T P_j) * (Q_i^T Q_j)), P_i = S_q A_i^T, Q_i = S_k B_i^T (cheap: dh x dh
blocks). Groups of equal size maximising sum_g sum_{i, j in g} K_ij are found by swapping heads
between groups from the consecutive grouping until no swap helps (a local optimum).

It applies where the scores are bilinear in the projections' outputs: the path from each projection
to the attention core holds layout ops, casts and scalar factors only (no RoPE, no q/k norm), and
every query head has its own key head (no GQA; with GQA the mean of the queries already gives the
mean score, since the group shares its key).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from switchhead.graph.ops import CAST_OPS, LAYOUT_OPS, NOOP_OPS, linear_parts
from switchhead.graph.provenance import region_between
from switchhead.graph.surgery import linear_weight

aten = torch.ops.aten
_SCALAR_FACTORS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
RIDGE = 1e-4  # of the mean eigenvalue of X^T X


def bilinear_path(projection: torch.fx.Node, operand: torch.fx.Node) -> bool:
    """Whether `operand` (a core input) is the projection's output moved around and scaled by plain
    numbers only, so that scores stay bilinear in the projection's rows."""
    for node in region_between([projection], operand):
        if node.op != "call_function":
            return False
        if node.target in LAYOUT_OPS or node.target in CAST_OPS or node.target in NOOP_OPS:
            continue
        if node.target is operator.getitem:
            continue
        if node.target in _SCALAR_FACTORS and not isinstance(node.args[1], torch.fx.Node):
            continue
        return False
    return True


def augmented(x: torch.Tensor, with_bias: bool) -> torch.Tensor:
    """x [N, D] -> [N, D+1] with a column of ones when the projection has a bias (fp64)."""
    x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    return torch.cat([x, torch.ones_like(x[:, :1])], 1) if with_bias else x


def head_rows(values: dict, proj: torch.fx.Node, columns: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each head's rows [dh, D] of the projection, its bias as the last column where it has one;
    the projection's example input [N, D] augmented to match, fp64); columns [H, dh]."""
    weight, bias = linear_weight(values, proj)
    rows = weight if bias is None else torch.cat([weight, bias[:, None]], 1)
    return [rows[c] for c in columns], augmented(values[linear_parts(proj)[0]], bias is not None)


def _root_and_inverse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) of S = (X^T X / N + ridge)^(1/2), symmetric."""
    cov = x.T @ x / x.shape[0]
    cov = cov + RIDGE * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(cov.shape[0], dtype=cov.dtype)
    eigval, eigvec = torch.linalg.eigh(cov)
    root = eigval.clamp_min(0).sqrt()
    return (eigvec * root) @ eigvec.T, (eigvec / root) @ eigvec.T


def mean_form(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> torch.Tensor:
    """M = mean_i A_i^T B_i [Dq, Dk]: the group's mean score as a bilinear form (fp64)."""
    return torch.stack([a.T.to(torch.float64) @ b.to(torch.float64) for a, b in zip(queries, keys)]).mean(0)


def fit_group(queries: list[torch.Tensor], keys: list[torch.Tensor], xq: torch.Tensor,
              xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's rows (A [dh, Dq], B [dh, Dk]) whose scores best match the mean of the group's
    heads' scores (queries[i] [dh, Dq], keys[i] [dh, Dk]) on the tokens xq [N, Dq], xk [N, Dk]; fp64."""
    dh = queries[0].shape[0]
    mean = mean_form(queries, keys)
    sq, sq_inv = _root_and_inverse(xq)
    sk, sk_inv = _root_and_inverse(xk)
    u, sigma, vh = torch.linalg.svd(sq @ mean @ sk)
    scale = sigma[:dh].sqrt()[:, None]
    return scale * (u[:, :dh].T @ sq_inv), scale * (vh[:dh] @ sk_inv)


def fittable(site, head_columns: list) -> bool:
    """Scores bilinear in the Q/K projections' rows (`head_columns`: the fold plan's (projection,
    columns) of Q and K), every query head with its own key head."""
    if len(head_columns) != 2:  # GQA: the mean of the queries is already the mean score
        return False
    query, key = site.core_operands[:2]
    return all(bilinear_path(proj, anchor) for (proj, _), anchor in zip(head_columns, (query, key)))


def score_gram(queries: list[torch.Tensor], keys: list[torch.Tensor], xq: torch.Tensor,
               xk: torch.Tensor) -> torch.Tensor:
    """K [H, H]: inner products of the heads' scores on the tokens (queries[i] [dh, Dq], keys[i]
    [dh, Dk]; xq [N, Dq], xk [N, Dk]); fp64."""
    sq, _ = _root_and_inverse(xq)
    sk, _ = _root_and_inverse(xk)
    p = torch.stack([sq @ a.T.to(torch.float64) for a in queries])  # [H, Dq, dh]
    q = torch.stack([sk @ b.T.to(torch.float64) for b in keys])  # [H, Dk, dh]
    return (torch.einsum("iab,jac->ijbc", p, p) * torch.einsum("idb,jdc->ijbc", q, q)).sum((-1, -2))


def similar_groups(gram: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Groups of the same sizes as `members` [H2, G] (the starting grouping) whose within-group sums
    of `gram` [H, H] are a local maximum under swapping two heads of different groups; each row
    sorted, rows by their first head."""
    groups = [list(map(int, row)) for row in members]

    def within(group: list[int]) -> float:
        return float(gram[group][:, group].sum())

    improved = True
    while improved:
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                for i in range(len(groups[a])):
                    for j in range(len(groups[b])):
                        old = within(groups[a]) + within(groups[b])
                        new_a = groups[a][:i] + [groups[b][j]] + groups[a][i + 1:]
                        new_b = groups[b][:j] + [groups[a][i]] + groups[b][j + 1:]
                        if within(new_a) + within(new_b) > old + 1e-9 * abs(old) + 1e-12:
                            groups[a], groups[b], improved = new_a, new_b, True
    out = torch.tensor([sorted(g) for g in groups], dtype=members.dtype)
    return out[out[:, 0].argsort()]


def score_error(a: torch.Tensor, b: torch.Tensor, queries: list[torch.Tensor], keys: list[torch.Tensor],
                xq: torch.Tensor, xk: torch.Tensor) -> float:
    """|| scores of (a, b) - mean scores of the group ||_F / || mean scores ||_F on the tokens."""
    target = xq @ mean_form(queries, keys) @ xk.T
    return float((xq @ (a.T.to(torch.float64) @ b.to(torch.float64)) @ xk.T - target).norm() / target.norm())
