"""``python -m services.gateway``: serve the feed gateway (settings: ``settings.py``)."""

from services.common.server import exit_after
from services.gateway.server import main

exit_after(main)
