"""Prompt sources, prepared prompt folders and the teacher-draft cache.

A prompt source (`data.prompts`, `tropd prepare --data`) is a folder written by `tropd prepare` or a prompt
generator, listed below by name and the module that holds its `SPEC` (see `generators.py`). The table is
names only, so that the configuration checks a name without importing any generator; it is the one place
the rest of tropd learns of the toy lab's.
"""

GENERATORS: dict[str, str] = {"toylab": "tropd_cli.toylab.generator"}


def is_generator(name: str) -> bool:
    """Whether `name` (a data.prompts, --data, benchmark source or grader) names a prompt generator."""
    return name in GENERATORS
