"""The command line: click parsing and exit codes only; command bodies live in their rooms."""
