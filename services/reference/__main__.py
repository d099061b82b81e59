"""``python -m services.reference``: serve the naive reference feed (settings: ``server.py``)."""

from services.reference.server import main

raise SystemExit(main())
