"""Input files that must not hang or exhaust memory (issue 23)."""


def laughs(levels: int = 9) -> str:
    """A YAML flow list whose last element stands for 9**levels strings through nested aliases
    ("billion laughs", a few hundred bytes)."""
    parts = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"
