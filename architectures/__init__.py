"""Your own model architectures.

Put a module here with a builder `build(input_shape, n_classes, **options)` that returns a
`torch.nn.Module`, and name it in params.yaml as `arch: architectures.mymodule:build`
(options are the model spec's other keys, e.g. `{arch: architectures.mymodule:build, width: 64}`).

dvc.yaml declares this directory a dependency of every stage that builds or loads models,
so editing a module here reruns them, and the lineage records each file's sha256. An
architecture elsewhere in the repository is not tracked: `shrinkflow check` reports it.
"""
