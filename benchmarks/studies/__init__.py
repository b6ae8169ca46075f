"""Studies of whole training runs: replication, label noise, cost, tuning and the verdict. Run
each as ``python -m benchmarks.studies.<name>`` from the repository root."""
