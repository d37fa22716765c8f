"""The engine: fitting the non-zeros of sparse factors on fixed patterns.

``options`` (typed, checked options), ``result`` (``FitResult`` and the pattern builder that the
full and the sampled fit share), ``objective`` (value and gradient over column blocks),
``optimize`` (the one run loop ``Run``: stopping rules, best iterate, Ctrl-C, time limit; L-BFGS
and Adam), ``gauss_newton`` (Levenberg-Marquardt), ``lifted`` (the lifted start), ``fit`` (the
full-batch fit) and ``sampled`` (the column-block fit for huge, sparse or memory-mapped inputs).

Layer rule: may import ``sfa_cli.approximations``, ``sfa_cli.io`` and the foundation modules;
never ``sfa_cli.methods`` or ``sfa_cli.cli``.
"""
