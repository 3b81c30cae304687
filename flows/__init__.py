"""Prefect flows and the `shrinkflow` CLI: wiring only; the code they run lives in tasks/."""
