"""``python -m services.rollout``: run the rollout controller (settings: ``settings.py``)."""

from services.common.serving_only import block_training_stack

block_training_stack()  # before anything else imports: a serving image has none of it

from services.common.server import exit_after  # noqa: E402
from services.rollout.server import main  # noqa: E402

exit_after(main)
