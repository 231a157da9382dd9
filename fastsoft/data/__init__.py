"""Stage 1 of the pipeline: jobs (a context, its queries) and the prompt template σ takes its place in."""
