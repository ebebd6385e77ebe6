"""Layer 3: the stages every study runs over a run folder (generate, judge, validate, preference shift, report)."""
