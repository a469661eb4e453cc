import sys

from smallm.cli import main

sys.exit(main())
