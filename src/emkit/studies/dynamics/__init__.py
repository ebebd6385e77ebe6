"""Training dynamics: evaluate every checkpoint (`emkit track`), find when EM emerges, follow the LoRA weights.

- `checkpoints`: find a run's checkpoints and tell a completely written one from a partial one.
- `watch`: concurrent mode, evaluating each checkpoint as soon as it is complete while training runs.
- `evaluate`: one checkpoint's answers (every prompting mode), judgments and preference shift.
- `analysis`, `onset`: EM curves with intervals, onset steps, divergence, judge agreement.
- `weights`: LoRA A/B norms, successive-update cosines, PCA of the B trajectory, similarity to the final.
- `track`: the command's orchestration; `figures`, `report`: its figures and HTML page.
"""
