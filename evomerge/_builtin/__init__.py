"""The built-in search spaces, evaluators (with their lm-eval task folders) and experiments.

Each folder here is a symlink to the repository's top-level folder of that name, the one source
of truth: an editable install reads them through the links, and building the wheel copies the
files they point to into the package (pyproject.toml's package-data), so `importlib.resources`
finds them the same way in both.
"""
