import sys

from tropd_cli.cli import main

sys.exit(main())
