"""lowrank's benchmark suite: ``python -m bench`` times each op against its baselines on a GPU."""
