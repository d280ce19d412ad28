from pathlib import Path


def tiny_model_spec() -> str:
    return f"{Path(__file__).parent / 'data' / 'tiny_model.py'}:make_model"


def load_tiny_model(**kwargs):
    from disco.models import build_model
    return build_model(tiny_model_spec(), **kwargs)
