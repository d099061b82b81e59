"""The tools that drive both sides: the ``homefeed`` CLI, the demo, the local mesh
supervisor, the benchmark with its floor and naive reference, and the service footprint."""
