"""Building blocks shared by every model: RoPE, norms, MLPs."""
