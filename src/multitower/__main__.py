import sys

from multitower.cli import main

sys.exit(main())
