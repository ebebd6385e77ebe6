"""Detection and steering: activations, misalignment directions, probes, ablation and sweeps.

Layer k is always the output of decoder block k (layer -1: the embeddings); see `emkit.studies.interp.layers`.
"""
