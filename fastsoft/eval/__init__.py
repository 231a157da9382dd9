"""Stage 4: held-out metrics of a soft prompt against the full-context teacher, and generation with it."""
