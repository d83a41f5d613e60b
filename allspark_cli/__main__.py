"""`python -m allspark_cli ...` (what `torchrun --nproc_per_node N -m allspark_cli train ...` runs)."""
from allspark_cli.cli.app import main

if __name__ == "__main__":
    main()
