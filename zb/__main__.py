import sys

from zb.cli import main

sys.exit(main())
