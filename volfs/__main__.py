import sys

from volfs.cli import main

sys.exit(main())
