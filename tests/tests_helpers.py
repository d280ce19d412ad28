from pathlib import Path


def tiny_model_spec() -> str:
    return f"{Path(__file__).parent / 'data' / 'tiny_model.py'}:make_model"
