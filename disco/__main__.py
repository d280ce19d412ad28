import sys

from disco.cli.main import main

sys.exit(main())
