"""``python -m r2d2voice``."""

from r2d2voice.cli.main import main

if __name__ == "__main__":
    main()
