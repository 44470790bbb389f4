"""Browser tests and the small stores they (and the AppTests) use."""
