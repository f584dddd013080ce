"""Everything that makes an exit cache, by what it does.

- :mod:`~eenet.ingest.model`: load a frozen model, run its exits, ``cache_model``
  (what ``eenet cache`` calls);
- :mod:`~eenet.ingest.pipeline`: the caching runs (one process, resumable,
  distributed) and their options;
- :mod:`~eenet.ingest.costs`: per-exit latency and FLOPs, or costs reused from a cache;
- :mod:`~eenet.ingest.data`: datasets from ``.npz`` files, factories and registered names;
- :mod:`~eenet.ingest.forward`: the forward contract, batch streaming, and the module
  producing each exit (for hooks that time exits or stop at one);
- :mod:`~eenet.ingest.features`: each exit's hidden features (the input of its head's
  last linear layer), captured by hooks for ``eenet cache --features``;
- :mod:`~eenet.ingest.stream`: the writer thread and the state of a resumable run;
- :mod:`~eenet.ingest.distributed`: sharding over ``torchrun`` ranks and merging;
- :mod:`~eenet.ingest.arrays`: logits or probabilities a user already has
  (what ``eenet import`` calls);
- :mod:`~eenet.ingest.resolve`: ``package.module:function`` import paths.

Nothing here imports :mod:`eenet.examples`; the example registers its dataset name.
"""
