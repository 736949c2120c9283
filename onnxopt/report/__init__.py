"""What the user reads: terminal tables, JSON reports, progress bars."""
