"""Memory and layout planning: per-GPU memory of a configuration at each TP x PP x DP layout."""
