"""``python -m tools.reference``: serve the naive reference feed (settings: ``server.py``)."""

from services.common.server import exit_after
from tools.reference.server import main

exit_after(main)
