"""The apply transaction: the pipeline and the stored last-known-good document."""
