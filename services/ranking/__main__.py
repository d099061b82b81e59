"""``python -m services.ranking``: serve the ranking service (settings: ``settings.py``)."""

from services.common.server import exit_after
from services.ranking.server import main

exit_after(main)
