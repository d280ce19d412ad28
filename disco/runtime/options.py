"""Options of one distributed run (`disco run`, `python -m disco.runtime`): stated once, here; the command
line is derived from these fields (disco/fields.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from disco.fields import option, option_of
from disco.errors import DiscoError
from disco.files import check_output_file

MAX_INFLIGHT = 64  # batches in flight: each holds a process-group lane per rank pair and a thread per rank


def check_budget(budget: float | None) -> None:
    """A budget picks one of a deployment's nested budgets: a fraction in (0, 1] (nan passes no comparison)."""
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise DiscoError(f"--budget must be a fraction in (0, 1], got {budget!r}")


@dataclass(kw_only=True)
class RunOptions:
    deploy: str = option(positional=True, help="deployment folder written by `disco export`")
    input: str | None = option(None, help="an image, a folder of images, or a .safetensors file with a tensor "
                                          "'input'")
    eval: bool = option(False, help="score the model on the test images its training report used (accuracy, "
                                    "mIoU, mAP or PSNR by task)")
    serve: bool = option(False, help="answer the requests of `disco serve` (rank 0 reads its address and key from "
                                      "its environment; start the ranks of other hosts with --serve as well)")
    limit: int | None = option(None, help="with --eval: only this many of those test images")
    batch_size: int | None = option(None, help="images per forward (default 1; 256 with --eval)")
    repeat: int = option(1, help="run each batch this many times (latency)")
    warmup: int = option(0, help="untimed runs of the first batch before timing")
    inflight: int = option(1, metavar="K", help="batches in flight at once: while one waits for a peer's "
                           "channels, a rank computes another (images per second up, each image's latency "
                           "about the same or longer); every rank must be given the same K")
    budget: float | None = option(None, help="a deployment carrying several nested budgets (`disco export RUN "
                                  "--budgets ...`): the one to run at (default: the one it was trained for; `disco "
                                  "export` lists them)")
    timeout: float = option(60.0, help="seconds to wait for a peer before failing with an error naming it")
    backend: str = option("auto", choices=("auto", "gloo", "nccl"),
                          help="auto: NCCL if every rank has a GPU, else gloo")
    save_output: str | None = option(None, help="write the outputs to this .safetensors file (rank 0)")
    summary: str | None = option(None, help="write predictions, latency and bytes sent per rank to this JSON file")
    profile: str | None = option(None, metavar="DIR", help="time every layer on every rank: per-rank torch.profiler "
                                 "traces (DIR/rankK.trace.json, open in ui.perfetto.dev) and a table of compute, "
                                 "waiting and bytes per layer (DIR/layers.md, .json) written by rank 0")
    pin_cores: bool = option(True, help="let ranks share this host's cores as they please (default: each rank "
                                        "keeps to its own cores, when there are enough for all)")
    quiet: bool = option(False, help="print nothing but errors")
    verbose: bool = option(False, help="on failure, show the traceback (and torchrun's own log and reports)")
    model_code: str | None = option(None, metavar="FILE", help="the Python file defining the deployment's model, "
                                    "when it is not a registered torchvision:/disco: model: a deployment never runs "
                                    "code by itself; the file must be the one it was exported with (sha256)")
    verify_key: str | None = option(None, metavar="PUBLIC_KEY", help="refuse the deployment unless it is signed by "
                                    "the owner of this Ed25519 public key (`disco keygen`, `disco export "
                                    "--sign-key`)")

    def __post_init__(self) -> None:
        if self.serve and (self.input is not None or self.eval):
            raise DiscoError("--serve answers `disco serve`'s requests: it takes no --input or --eval")
        if not self.serve and (self.input is None) == (not self.eval):
            raise DiscoError("give exactly one of --input PATH or --eval")
        if self.batch_size is None:
            self.batch_size = 256 if self.eval else 1
        if self.batch_size < 1 or self.repeat < 1 or self.warmup < 0 or (self.limit is not None and self.limit < 1):
            raise DiscoError("--batch-size, --repeat and --limit must be at least 1, --warmup at least 0")
        if not 1 <= self.inflight <= MAX_INFLIGHT:
            raise DiscoError(f"--inflight must be in 1..{MAX_INFLIGHT} (each batch in flight holds its own lanes)")
        check_budget(self.budget)
        if self.inflight > 1 and self.profile:
            raise DiscoError("--profile times one batch at a time: leave out --inflight (or give 1)")
        if self.timeout <= 0:
            raise DiscoError("--timeout must be positive (seconds)")


def check_out(path: str) -> None:
    """The topology file can be written there: refused before anything is measured."""
    if Path(path).is_dir():
        raise DiscoError(f"--out {path} is a folder; give the file to write, e.g. {Path(path) / 'topology.json'}")
    check_output_file(path, "--out")


@dataclass(kw_only=True)
class ProbeOptions:
    deploy: str = option(positional=True, help="deployment folder written by `disco export` (its model is timed "
                                               "and its node count is the number of ranks)")
    out: str = option("topology.json", help="the topology file rank 0 writes")
    timeout: float = option(60.0, help="seconds to wait for a peer before failing with an error naming it (more "
                                       "than the slowest node's compute probe)")
    threads: int | None = option(None, help="CPU threads per rank (default: as `disco run`: cores / nodes, or "
                                            "OMP_NUM_THREADS)")
    pin_cores: bool = option_of(RunOptions, "pin_cores")
    model_code: str | None = option_of(RunOptions, "model_code")
    verbose: bool = option(False, help="on failure, show the traceback (and torchrun's own log and reports)")

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise DiscoError("--timeout must be positive (seconds)")
        if self.threads is not None and self.threads < 1:
            raise DiscoError("--threads must be at least 1")
        if not self.out:
            raise DiscoError("--out must name a file")
