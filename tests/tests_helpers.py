from pathlib import Path


def tiny_model_file() -> str:
    """A user's own model file: deployments of its models run only with `--model-code` naming it."""
    return str(Path(__file__).parent / "data" / "tiny_model.py")


def tiny_model_spec() -> str:
    return f"{tiny_model_file()}:make_model"


def load_tiny_model(**kwargs):
    from disco.models import build_model
    return build_model(tiny_model_spec(), **kwargs)
