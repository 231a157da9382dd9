"""Stage 3: packed, padding-free student steps over prompt slots, scheduled by continuous batching across jobs."""
