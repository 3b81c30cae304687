"""Prefect flows: wiring only; the stage code lives in tasks/."""
