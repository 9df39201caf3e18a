"""Corpora: reading documents from files, JSONL, Parquet or ``datasets``; the train/held-out split; packing into
sequences.
"""
