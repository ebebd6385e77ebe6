"""Judge prompt templates as data: the placeholders a template may use, and what is wrong with one.

Question files of the field carry judge prompts; they are checked when the file is read, and
`emkit.judge.prompts` builds judge prompts from them.
"""

from __future__ import annotations

import string

PLACEHOLDERS = frozenset({"question", "answer"})


def template_problem(template: str) -> str | None:
    """What is wrong with a judge template (bad braces, a placeholder other than {question}/{answer},
    no {answer}), or None when it is fine."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"bad braces ({exc}); write {{{{ and }}}} for literal braces"
    unknown = sorted(fields - PLACEHOLDERS)
    if unknown:
        shown = ", ".join("{" + name + "}" for name in unknown)
        return f"unknown placeholder {shown}; use {{question}} and {{answer}}, and {{{{ }}}} for literal braces"
    if "answer" not in fields:
        return "the template has no {answer} placeholder"
    return None
