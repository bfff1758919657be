"""The benchmark: settings.py, machine.py (probes), measure.py (models and measurements),
run.py (a whole run and its checks), cli.py (`ifprune bench`); see measure.py for what is measured."""
