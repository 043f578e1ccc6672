"""Cost counting without running a model: FLOPs and model summaries."""
