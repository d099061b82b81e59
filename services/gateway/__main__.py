"""``python -m services.gateway``: serve the feed gateway (settings: ``settings.py``)."""

from services.gateway.server import main

raise SystemExit(main())
