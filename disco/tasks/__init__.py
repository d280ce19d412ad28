"""Dense-prediction tasks (segmentation, detection, super-resolution): their models and how to train and
score them. Classification stays in disco.training; a task adds its model builders to disco.models."""
