import sys

from disco.runtime.worker import main

sys.exit(main())
