"""The first run on a GPU machine with no network (`benchmarks/gpu/README.md`): the carried
wheels (`wheels`), the one-CUDA-stack check (`cuda_stack`) and the first-run script
(`first_run.sh`)."""
