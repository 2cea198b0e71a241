"""Prompt sources, prepared prompt folders and the teacher-draft cache."""
