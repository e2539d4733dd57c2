"""The experiment harness of larq-noisy: datasets, protocols, run directories, training,
tuning and reports, over the method in `larq_noisy` and the architectures in `models`.
It runs from a checkout (train.py, tune.py, export.py, bench/); `pip install .` installs
the method alone."""
