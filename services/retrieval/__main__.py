"""``python -m services.retrieval``: serve the retrieval service (settings: ``settings.py``)."""

from services.retrieval.server import main

raise SystemExit(main())
