"""Stage 2 of the pipeline: the frozen model with the full context answers every query, and what it
predicts at each answer token is cached (``batching`` → ``targets`` → ``cache``; ``stage`` runs them)."""
