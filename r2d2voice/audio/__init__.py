"""PCM, resampling, playout, audio files, VAD, beeps, gates and sound devices (no protocol)."""
