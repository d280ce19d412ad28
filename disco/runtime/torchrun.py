"""torchrun, as `disco run`, `disco serve` and `disco probe` start it on one host: `python -m disco.runtime.torchrun`
takes torchrun's own arguments and runs its own main (torch.distributed.run), then leaves without the
interpreter's teardown, which takes about a second with torch loaded (measured on 2 cores) once the ranks have
ended and torchrun has stopped its agent and rendezvous. On several hosts, users start torchrun itself."""
import os
import sys


def run_and_leave() -> None:
    from torch.distributed.run import main

    try:
        main()
        status = 0
    except SystemExit as leaving:  # torchrun's own exits (a failed rank, bad arguments)
        status = leaving.code if isinstance(leaving.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run_and_leave()
