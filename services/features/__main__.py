"""``python -m services.features``: serve the features service (settings: ``settings.py``)."""

from services.features.server import main

raise SystemExit(main())
