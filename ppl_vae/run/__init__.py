"""Running the inference: a run's setup (device, data, the model built and probed once),
``train_run``, the one training loop, data-parallel processes, the run directory and its
checkpoints. Above :mod:`ppl_vae.inference` (Pyro math), below the CLI and evaluation."""
