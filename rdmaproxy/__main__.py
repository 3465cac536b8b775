"""``python -m rdmaproxy``: the same as the ``rdmaproxy`` command."""

from rdmaproxy.cli import main

raise SystemExit(main())
