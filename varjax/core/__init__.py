"""What every command and task stands on: paths, errors, the mesh and its rules, multi-process start-up,
checkpoints, model directories, metrics, the optimizer, XLA options, the compilation cache."""
