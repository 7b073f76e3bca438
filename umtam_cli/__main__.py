"""`python -m umtam_cli` runs the CLI (torchrun needs a module to launch)."""

from umtam_cli.main import main

if __name__ == "__main__":
    main()
