"""The methods that ``sfa compare`` ranks, and ``compare`` itself.

``registry`` describes every method as data (options, description, dense-only reason); ``runs``
holds one ``run`` function per record; ``compare`` runs them at one budget or a sweep and gives
the verdicts. One module per family implements them: ``baselines`` (low rank, top-k, low rank +
sparse, Monarch), ``butterfly``, ``learned`` (learned supports and Chord + sparse) and
``learned_scale`` (learned supports from blocks of A at scale).

Layer rule: may import the engine, the approximations, ``sfa_cli.io`` and the foundation
modules; never ``sfa_cli.cli``.
"""
