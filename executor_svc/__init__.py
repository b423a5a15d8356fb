"""The PagedServe executor: one process per GPU that runs the scheduler's step plans."""
