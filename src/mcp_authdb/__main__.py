"""Allow ``python -m mcp_authdb``."""

import sys

from mcp_authdb.cli import main

sys.exit(main())
