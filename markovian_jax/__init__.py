"""markovian-jax: Markovian chain-of-thought training (Viteri et al.) in JAX/Flax."""
