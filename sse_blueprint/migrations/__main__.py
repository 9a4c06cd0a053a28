from __future__ import annotations

import sys

from sse_blueprint.migrations import main

sys.exit(main())
