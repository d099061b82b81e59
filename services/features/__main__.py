"""``python -m services.features``: serve the features service (settings: ``settings.py``)."""

from services.common.server import exit_after
from services.features.server import main

exit_after(main)
