"""Which of the model's parameters a static value of a captured graph is computed from: the layer whose weight a
convolution or linear reads (that call is the layer's), and whether a value reads any parameter at all (its bytes
then count as parameter bytes)."""
from __future__ import annotations

import torch
from torch import fx, nn

from disco.split.capture import PARAMETER, Captured


def layer_of_weight(captured: Captured, model: nn.Module, static: set[fx.Node], weight: fx.Node) -> str | None:
    """The module whose `weight` parameter a static operand is computed from (alone), or None."""
    found = _parameters_within(captured, weight, static)
    name = found.pop() if len(found) == 1 else None
    if name is None or name.rpartition(".")[2] != "weight" or "." not in name:
        return None
    module_name = name.rpartition(".")[0]
    weight_value = getattr(model.get_submodule(module_name), "weight", None)
    if isinstance(weight_value, torch.Tensor) and tuple(weight_value.shape) == tuple(weight.meta["val"].shape):
        return module_name
    return None


def _parameters_within(captured: Captured, graph_node: fx.Node, within: set[fx.Node]) -> set[str]:
    """The parameters a value is computed from, following only the graph nodes in `within`."""
    found, stack, seen = set(), [graph_node], set()
    while stack:
        current = stack.pop()
        if current in seen or current not in within:
            continue
        seen.add(current)
        if current.op == "placeholder" and captured.roles[current][0] == PARAMETER:
            found.add(captured.roles[current][1])
        stack.extend(current.all_input_nodes)
    return found


def reads_parameter(captured: Captured, graph_node: fx.Node) -> bool:
    """Is the value computed from some parameter of the model?"""
    stack, seen = [graph_node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder" and captured.roles[current][0] == PARAMETER:
            return True
        stack.extend(current.all_input_nodes)
    return False
