"""Bias analysis: how post-training shifts a model's political and economic leaning.

Models complete sentence stems (`prompts`: emkit's 40 over 8 topics, or the original experiment's
file as it is), each in its own mode (`complete`: raw continuation or chat); every completion is
labelled progressive, conservative, neutral or off-topic by a keyword classifier (`keywords`:
per-topic lexicons, word boundaries, negation, off-topic filter) and by an LLM classifier
(`llm_classifier`: any emkit judge, label probabilities, cached); `compare` gives distributions with
bootstrap intervals, tests between models, per-topic and per-stem shifts and the classifiers'
agreement; `figures` and `report` draw them; `run` is `emkit bias CONFIG`.
"""
