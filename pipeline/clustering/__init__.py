"""Arrays in, ``(result, stats)`` out: the PCA basis, exactly balanced k-means (auction), cluster↔expert matching."""
