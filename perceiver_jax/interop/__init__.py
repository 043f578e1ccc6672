"""Other implementations' checkpoints: reading them into ours and back."""
