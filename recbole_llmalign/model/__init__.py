"""The plugin's models, one per file; ``utils.get_model`` finds them by name without importing all."""
