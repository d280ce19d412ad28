"""The tasks DISCO trains and runs (classification, segmentation, detection, super-resolution). Each module
defines one task (objective, how node 0 describes outputs, data, built-in models) and registers it in
disco.tasks.registry on import; a new task is one more module imported here."""
from disco.tasks import classification, segmentation, detection, superres  # noqa: F401  (registration order)
