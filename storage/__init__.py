"""Every byte on disk: the run-directory layout, manifests, and the Zarr states store."""
