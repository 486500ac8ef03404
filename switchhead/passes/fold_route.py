"""Routers of a folded site fitted to the dense heads' contributions (fold_router="contribution"):
each token's top-k experts start as the group's heads that contributed most to it.

Shape legend: N example tokens, H2 new heads (or KV heads for the V router), E experts per head,
d router input width, dh head size, d_out width of the O projection's output.

Expert e of a new head copies dense head m(e) of its group. On the example activations the dense
head's share of the attention output at a token is c = || z_m W_O,m^T || (O router: z_m the head's
attention output there) or || (x V_m^T + b_m) W_O,m^T || (V router: what the token's value adds
through that head's O rows, whichever query reads it). The target logit is log c centred over the
head's experts, scaled to std `LOGIT_STD`; the router weights are its ridge least-squares fit on the
router's input.

Why logits of std 0.1 and not the tiny ones of upcycling: AdamW moves every weight by ~lr per step
whatever its gradient, so a router scaled to logits of 1e-6 is overwritten by its first update and
the fitted order is lost. Larger logits move the gates away from the 1/2 the expert scales assume:
on all-MiniLM-L6-v2 12 -> 4 (fold_qk="fit", 32 sentences) the unhealed cosine was 0.576 at std
1e-3, 0.569 at 0.1 and 0.475 at 1.0 (0.542 with random routers); 0.1 keeps the order through the
first steps at a small cost.
"""

from __future__ import annotations

import torch

LOGIT_STD = 0.1
RIDGE = 1e-3  # of the mean eigenvalue of X^T X / N
_EPS = 1e-12


def output_contributions(z: torch.Tensor, columns: torch.Tensor, output_heads: torch.Tensor) -> torch.Tensor:
    """z [N, F] (the O projection's input), columns [H2, E, dh] (z's columns of each expert's dense
    head), output_heads [H2, E, dh, d_out] -> c [N, H2, E] = || z[:, columns] @ output_heads ||."""
    z = z.detach().to(torch.float64)
    out = torch.empty(z.shape[0], *columns.shape[:2], dtype=torch.float64)
    for head in range(columns.shape[0]):  # one new head at a time: [N, E, d_out] stays small
        per_expert = torch.einsum("ned,edo->neo", z[:, columns[head]], output_heads[head].to(torch.float64))
        out[:, head] = per_expert.norm(dim=-1)
    return out


def value_contributions(x: torch.Tensor, value_heads: torch.Tensor, value_bias: torch.Tensor | None,
                        output_heads: torch.Tensor) -> torch.Tensor:
    """x [N, d] (the V projection's input), value_heads [H2, E, d, dh], value_bias [H2, E, dh] or None,
    output_heads [H2, E, dh, d_out] -> c [N, H2, E] = || (x V + b) W_O ||."""
    x = x.detach().to(torch.float64)
    out = torch.empty(x.shape[0], *value_heads.shape[:2], dtype=torch.float64)
    for head in range(value_heads.shape[0]):
        v = torch.einsum("nd,edh->neh", x, value_heads[head].to(torch.float64))  # [N, E, dh]
        if value_bias is not None:
            v = v + value_bias[head].to(torch.float64)
        out[:, head] = torch.einsum("neh,eho->neo", v, output_heads[head].to(torch.float64)).norm(dim=-1)
    return out


def fitted_router(x: torch.Tensor, contributions: torch.Tensor) -> torch.Tensor:
    """x [N, d], contributions [N, R, E] -> router weight [R*E, d] (fp32) whose logits x W^T order
    each row's experts as the contributions do, with std LOGIT_STD on x."""
    x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    target = contributions.clamp_min(_EPS).log()
    target = (target - target.mean(-1, keepdim=True)).reshape(x.shape[0], -1)  # [N, R*E]
    gram = x.T @ x / x.shape[0]
    gram = gram + RIDGE * gram.diagonal().mean().clamp_min(_EPS) * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, x.T @ target / x.shape[0]).T  # [R*E, d]
    # the ridge shrinks the fit: rescale so the logits have the intended spread on the examples
    weight = weight * (LOGIT_STD / (x @ weight.T).std().clamp_min(_EPS))
    return weight.to(torch.float32)


def agreement(x: torch.Tensor, weight: torch.Tensor, contributions: torch.Tensor, top_k: int) -> float:
    """Share of (token, head) pairs whose top-k experts by the router's logits are the top-k by
    contribution (as sets)."""
    rows, experts = contributions.shape[1:]
    logits = (x.detach().to(torch.float64).reshape(-1, x.shape[-1]) @ weight.to(torch.float64).T)
    chosen = logits.view(-1, rows, experts).topk(top_k, -1).indices.sort(-1).values
    wanted = contributions.topk(top_k, -1).indices.sort(-1).values
    return float((chosen == wanted).all(-1).double().mean())
