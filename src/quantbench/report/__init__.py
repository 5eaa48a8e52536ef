"""The self-contained HTML report: leaderboards, plots and every run's card."""
