from pathlib import Path


def tiny_model_file() -> str:
    """A user's own model file: deployments of its models run only with `--model-code` naming it."""
    return str(Path(__file__).parent / "data" / "tiny_model.py")


def tiny_model_spec() -> str:
    return f"{tiny_model_file()}:make_model"


def load_tiny_model(**kwargs):
    from disco.models import build_model
    return build_model(tiny_model_spec(), **kwargs)


def train_with_sparsifier(model, sparsifier, steps, x, y):
    """`steps` SGD steps on one batch with the sparsifier's regulariser and schedule, as a training loop calls it."""
    import torch
    from torch import nn

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y) + sparsifier.regularizer()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
