"""The `disco` command line: one module per sub-command (`disco/cli/NAME_cmd.py`, with `add_parser(sub)`)."""
from disco.model_specs import MODEL_SPECS  # noqa: F401  (the commands' --model help reads it from here)

# Each command's one-line help, read by its module's parser and by `disco --help`, which imports no command
# module: a command's module (and torch, torchvision...) is loaded only when that command runs or explains itself.
COMMAND_HELP = {
    "inspect": "show how a model splits across nodes (bytes sent, MACs, memory per node)",
    "train": "train a model to a communication budget",
    "export": "write per-node shards and a manifest from a trained run",
    "run": "run a deployment on N local processes (torchrun; gloo, or NCCL on GPUs)",
    "probe": "measure the nodes' compute and links as a deployment uses them; write topology.json",
    "plan": "predict a split model's latency and images/s on a topology, and where the time goes",
    "serve": "serve a deployment over HTTP (batched predictions, health, metrics, a page to try it)",
    "bench": "run a benchmark (writes docs/results/)",
    "keygen": "make a key pair for signing deployments",
}

