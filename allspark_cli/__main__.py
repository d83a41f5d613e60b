"""`python -m allspark_cli ...` (what `torchrun --nproc_per_node N -m allspark_cli train ...` runs).

The import sits under the guard: worker processes started with "spawn" (prepare's conversion
pool) re-run this module as `__mp_main__`, and must not import the CLI (and torch) for nothing.
"""

if __name__ == "__main__":
    from allspark_cli.cli.app import main

    main()
