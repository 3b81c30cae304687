"""The compression library: methods that turn a trained model into a smaller or faster one.

Stage modules (tasks/compress.py, tasks/search.py, tasks/evaluate.py) use it; nothing here reads
params.yaml or writes stage outputs.
"""
