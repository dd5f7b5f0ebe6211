"""``python -m fedserver``: the same as the ``fedserver`` command."""

from fedserver.cli import main

raise SystemExit(main())
