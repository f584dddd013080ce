"""Everything that makes an exit cache: run a frozen model, time its exits, import arrays."""
