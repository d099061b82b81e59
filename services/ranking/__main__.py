"""``python -m services.ranking``: serve the ranking service (settings: ``settings.py``)."""

from services.ranking.server import main

raise SystemExit(main())
