"""`python -m sfa_cli` runs the command line (also under torchrun)."""
from sfa_cli.cli.commands import main

if __name__ == "__main__":
    main()
