"""Text side: sentence/review encoders, the on-disk embedding cache, cross-attention fusion."""
