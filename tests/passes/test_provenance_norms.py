"""Row-id replay through norms whose order comes before the dims (F.normalize's linalg_vector_norm,
norm.ScalarOpt_dim): over the feature dim they keep the rows; across rows they are refused."""

import pytest
import torch
import torch.fx

from switchhead.graph.provenance import ProvenanceError, replay

aten = torch.ops.aten


def _graph(op, dim: int):
    """x -> x / op(x, 2, [dim], keepdim=True) as an fx graph, with the example values of its nodes."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    norm = graph.call_function(op, (x, 2.0, [dim], True))
    out = graph.call_function(aten.div.Tensor, (x, graph.call_function(aten.expand_as.default, (norm, x))))
    graph.output(out)
    value = torch.randn(3, 4)
    values = {x: value, norm: op(value, 2.0, [dim], True)}
    values[out] = value / values[norm]
    return x, out, [n for n in graph.nodes if n.op == "call_function"], values


@pytest.mark.parametrize("op", [aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim])
def test_a_norm_over_features_keeps_the_rows(op):
    x, out, region, values = _graph(op, -1)
    rows = torch.arange(3).unsqueeze(1).expand(3, 4)
    assert torch.equal(replay(region, {x: rows}, values, "rows")[out], rows)


@pytest.mark.parametrize("op", [aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim])
def test_a_norm_across_rows_is_refused(op):
    x, _, region, values = _graph(op, 0)
    with pytest.raises(ProvenanceError, match="reduces across rows"):
        replay(region, {x: torch.arange(3).unsqueeze(1).expand(3, 4)}, values, "rows")
