import sys

from meshward import cli

sys.exit(cli.main())
