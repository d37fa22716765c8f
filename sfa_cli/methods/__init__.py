"""The methods that ``sfa compare`` ranks, and ``compare`` itself.

``registry`` describes every method as data (options, description, dense-only reason); ``runs``
holds one ``run`` function per record; ``compare`` runs them at one budget or a sweep and gives
the verdicts. One module per family implements them: ``low_rank`` (truncated and randomized
SVD, and the SVD helpers the others share), ``sparse`` (top-k, low rank + sparse), ``monarch``,
``butterfly``, ``learned`` (learned supports; its starts in ``learned_starts``),
``learned_scale`` (learned supports from blocks of A at scale) and ``chord_sparse``
(Chord + sparse).

Layer rule: may import the engine, the approximations, ``sfa_cli.io`` and the foundation
modules; never ``sfa_cli.cli``.
"""
