import sys

from sendit.cli import main

sys.exit(main())
