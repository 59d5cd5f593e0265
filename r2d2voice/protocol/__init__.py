"""What every protocol core shares with the shell: the actions vocabulary and the core's seam."""
