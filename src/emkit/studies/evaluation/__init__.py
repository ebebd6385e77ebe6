"""The EM evaluation study: `emkit run` (train, generate, judge, validate, preference shift, report) and imports."""
