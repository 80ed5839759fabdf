"""wiki_continuation: reference defaults (ALGORITHM.md §1, REFERENCE.md §2)."""

from markovian_jax.configs import base


def get_config():
  return base.get_config("wiki_continuation")
