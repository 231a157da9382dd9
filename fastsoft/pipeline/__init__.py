"""The run: a conductor (``conductor.py``) over one file per stage — prepare, teach, train, finish.

Each stage stands on the stage folders (``data``, ``teacher``, ``train``, ``eval``) and on ``io``; none imports
another stage. The conductor wires them together, owns the queues and the checkpoint, and holds no stage's logic.
"""
