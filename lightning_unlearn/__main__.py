"""``python -m lightning_unlearn <command> ...``."""

from lightning_unlearn.cli import main

if __name__ == "__main__":
    main()
