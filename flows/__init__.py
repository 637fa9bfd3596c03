"""Prefect 3 flows: thin wrappers that run vim_core steps with retries, logs and tracking."""
