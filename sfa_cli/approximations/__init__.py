"""Approximations: what a method returns, and the products that make it cheap to use.

``base`` holds the protocol every result implements (``Approximation``: shape, dtype, ``@``,
``.T``, ``columns``, ``to_dense``, ``save``) and the self-describing file container
(``load_approximation``); ``kinds`` the dense-free kinds (``LowRank``, ``SparseMatrix``,
``Monarch``, ``SumApproximation``); ``sparse_factors`` the chain of sparse factors
(``SparseFactors``); ``patterns`` the supports of such chains and all budget arithmetic;
``kernels`` the products of a chain (CSR, circulant shifts, compiled kernels), the one
implementation that the fit, ``@`` and the torch modules share.

Layer rule: may import ``sfa_cli.io`` and the top-level foundation modules (``errors``,
``limits``, ``memory``, ``validation``, ``metrics``); never the engine, the methods or the CLI.
"""
