"""Layer 4: the studies (evaluation, interp, dynamics, arms, bias): a config, a runner over stages, a report."""
