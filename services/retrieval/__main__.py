"""``python -m services.retrieval``: serve the retrieval service (settings: ``settings.py``)."""

from services.common.server import exit_after
from services.retrieval.server import main

exit_after(main)
