"""The rollout controller: canary releases of the ranking model (``controller.py``)."""
