"""The command line: ``commands`` (the click group and its commands: parse, make one library
call, render), ``jobs`` (what ``sfa fit`` computes around the fit) and ``report`` (tables, JSON,
CSV and plots).

Layer rule: the top layer; it may import every other layer and nothing imports it. Importing
``sfa_cli.cli.commands`` stays light (no numpy or torch) so that ``sfa --help`` is instant.
"""
