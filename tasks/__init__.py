"""shrinkflow stage code: one module per pipeline stage (a pure function plus a thin main()),
plus what the stages share (params, io, models, ...) and lineage, storage, registry and promotion."""
