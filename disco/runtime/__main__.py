"""One rank of a deployment (torchrun ... -m disco.runtime DEPLOY ...; `disco run` starts them)."""
import os
import sys

from disco.runtime.worker import main

status = main()
# Leave without the interpreter's teardown: with torch and torchvision loaded it takes about a second per rank
# (measured on 2 cores), after the process group is closed and every output is written and flushed.
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
