"""Transfers on a Dask cluster (``--cluster local:N`` or ``--cluster tcp://HOST:8786``).

The client lists the source as a local run does and cuts the listing, while it streams, into
partitions of consecutive keys (``partition.py``); each partition is a Dask task that runs the same
transfer engine in a worker process over exactly its keys (``task.py``); the client keeps a bounded
number of partitions in flight, replays their outcomes to the progress display and adds up their
summaries (``runner.py``). Dask is imported only by ``runner.py`` and ``task.py``, and only when a
command asks for a cluster.
"""
