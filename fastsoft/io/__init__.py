"""What a run writes and reads back: atomic files, checkpoints, PEFT exports, reports."""
