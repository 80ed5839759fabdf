"""Benchmarks of markovian-jax (`python -m benchmarks.<name>`, from the repository root).

A regular package, not a namespace package: a `benchmarks` directory elsewhere on sys.path (an
installed distribution's, a notebook's) cannot shadow this one or mix its modules in.
"""
