"""The sparsifier's parts: a scorer per method (disco/sparsify/scoring.py), a limit per kind of budget
(disco/sparsify/limits.py), the candidates a cut chooses among (disco/sparsify/candidates.py), and checkpoints
that keep the keys they have always had."""
import io

import pytest
import torch
from torch import nn

import disco
from disco.errors import DiscoError
from disco.sparsify import Sparsifier, SparsifyOptions
from disco.sparsify.candidates import Candidates, candidate_groups
from disco.sparsify.limits import GlobalBytes, LinkBudget, PerLinkBytes
from disco.sparsify.methods import METHODS
from disco.sparsify.scoring import SCORERS, GateScorer, ImportanceScorer, RandomScorer, make_scorer
from tests_helpers import train_with_sparsifier

CHECKPOINT_KEYS = {"steps_done", "frozen", "generator", "cuts", "nested", "importance", "gate_scores"}


def _two_nodes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(16, 1, 4, 4)
    return disco.partition(model, nodes=2, example_inputs=x[:1]), x, (x.mean((1, 2, 3)) > 0).long()


def test_every_method_has_its_scorer_and_no_other():
    assert tuple(SCORERS) == METHODS
    costs = {"a": torch.ones(2, 3)}
    kinds = {method: type(make_scorer(method, costs, torch.Generator())) for method in METHODS}
    assert kinds == {"learned": ImportanceScorer, "gates": GateScorer, "random": RandomScorer}
    with pytest.raises(DiscoError, match="no scorer"):
        make_scorer("magic", costs, torch.Generator())


def test_candidates_turn_a_keep_vector_back_into_each_layers_mask():
    costs = {"a": torch.tensor([[0.0, 2.0], [3.0, 0.0]]), "b": torch.tensor([[1.0, 1.0, 5.0]])}
    allowed = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.tensor([[True, False, True]])}
    groups = candidate_groups(["a", "b"], costs, costs, allowed)
    assert groups.value is None and groups.prices.tolist() == [2.0, 3.0, 1.0, 5.0]
    keep = torch.tensor([True, False, False, True])
    masks = groups.masks(keep)
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [[False, False, True]]
    assert torch.equal(groups.take(masks), keep)
    with pytest.raises(AttributeError):
        groups.value = torch.zeros(4)  # frozen: a cut's candidates do not change under it


def test_scorers_value_kept_groups_first_except_gates():
    costs = {"a": torch.ones(1, 4)}
    groups = Candidates(("a",), (torch.ones(1, 4, dtype=torch.bool),), torch.ones(4))
    was_kept = torch.tensor([True, True, False, False])
    learned = ImportanceScorer(costs)
    learned.gather({"a": torch.tensor([[1.0, 0.0, 3.0, 0.0]])})
    assert learned.value(groups, was_kept).tolist() == pytest.approx([2 + 1 / 9, 2.0, 1.0, 0.0])
    learned.after_cut()
    assert not learned.importance["a"].any()
    gates = GateScorer(costs)
    gates.gather({"a": torch.tensor([[1.0, 0.0, -3.0, 0.0]])})
    gates.after_cut()  # scores carry across cuts
    assert gates.value(groups, was_kept).tolist() == [-1.0, 0.0, 3.0, 0.0]
    assert bool((RandomScorer(torch.Generator()).value(groups, was_kept)[:2] >= 2).all())


def test_limits_keep_within_their_budget():
    prices = torch.tensor([4.0, 3.0, 2.0, 1.0])
    groups = Candidates(("a",), (torch.ones(1, 4, dtype=torch.bool),), prices, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert GlobalBytes(dense_price=10.0).keep(groups, 0.5, step=0).tolist() == [True, False, False, True]
    links = LinkBudget({"a": torch.tensor([[0, 0, 1, 1]])}, torch.tensor([0.5, 0.0]))
    options = SparsifyOptions(budget=0.5, total_steps=10)
    keep = PerLinkBytes(links, options).keep(groups, 0.5, step=options.end_step)
    assert keep.tolist() == [False, True, False, False]  # link 0: 3.5 of 7 bytes; link 1 nothing


@pytest.mark.parametrize("method", METHODS)
def test_checkpoints_keep_their_keys_and_load_into_a_new_sparsifier(method):
    simulated, x, y = _two_nodes()
    options = SparsifyOptions(budget=0.4, total_steps=12, method=method, min_cut_interval=2)
    sparsifier = Sparsifier(simulated, x[:1], options)
    train_with_sparsifier(simulated, sparsifier, 6, x, y)
    state = sparsifier.state_dict()
    assert set(state) == CHECKPOINT_KEYS
    assert set(state["importance"]) == set(state["gate_scores"]) == set(sparsifier.layers)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = Sparsifier(simulated, x[:1], options)
    again.load_state_dict(torch.load(buffer, weights_only=True))  # as training/checkpoint.py reads it
    assert again.steps_done == 6 and again.cuts == sparsifier.cuts
    for key in ("importance", "gate_scores"):
        for name, table in getattr(again, key).items():
            assert torch.equal(table, getattr(sparsifier, key)[name])
    assert torch.equal(again._generator.get_state(), sparsifier._generator.get_state())


def test_a_checkpoint_from_before_gates_loads():
    """Checkpoints written before the "gates" method have no gate scores."""
    simulated, x, _ = _two_nodes()
    sparsifier = Sparsifier(simulated, x[:1], SparsifyOptions(budget=0.4, total_steps=12, method="gates"))
    state = sparsifier.state_dict()
    del state["gate_scores"]
    sparsifier.load_state_dict(state)
    assert all(not t.any() for t in sparsifier.gate_scores.values())


def test_a_latency_budget_and_per_link_budgets_are_refused_together():
    simulated, x, _ = _two_nodes()

    class Latency:
        seconds = 1.0

        def prices(self, model):
            return {name: torch.ones_like(layer.group_mask) for name, layer in disco.disco_layers(model).items()}

    options = SparsifyOptions(budget=0.5, total_steps=10, link_budgets=((0, 1, 0.1),))
    with pytest.raises(DiscoError, match="not both"):
        Sparsifier(simulated, x[:1], options, latency=Latency())
    with pytest.raises(DiscoError, match="latency budget"):
        Sparsifier(simulated, x[:1], options).cut_to_latency()
