"""Running the inference: the session (the config resolved, device, data, the model built and
probed once), ``train_run``, the one training loop, the run directory and its checkpoints.
Above :mod:`ppl_vae.inference` (Pyro math), below the CLI and evaluation."""
