"""The frozen model, as every stage runs it: loading (``loading.py``: an HF folder, a GGUF file, the embedded
SmolLM2), the attention implementations (``attention.py``), the fused layer ops (``layers.py``), the shared frozen
prefix (``prefix.py``) and padding-free packing of student segments (``packing.py``). Teacher, train and eval all
stand on it; it stands on ``ops`` and ``io``'s atomic writes (the converted GGUF cache)."""
