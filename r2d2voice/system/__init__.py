"""The host: settings (the one source of defaults), logging, systemd notifications."""
