"""``python -m pipeline.cli`` runs the command line, like ``lpr-distill``."""

from pipeline.cli import run

run()
