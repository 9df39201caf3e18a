"""Prefect orchestration of the pipeline stages (thin wrappers over ``pipeline.run_<stage>``)."""
