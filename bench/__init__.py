"""webchat's benchmark suite: load, idle, pages and purge modes, and a reference relay (run by hand)."""
