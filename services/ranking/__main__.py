"""``python -m services.ranking``: serve the ranking service (settings: ``settings.py``)."""

from services.common.serving_only import block_training_stack

block_training_stack()  # before anything else imports: a serving image has none of it

from services.common.server import exit_after  # noqa: E402
from services.ranking.server import main  # noqa: E402

exit_after(main)
