"""shrinkflow stages: each module is one pipeline stage, a pure function plus a thin main()."""
