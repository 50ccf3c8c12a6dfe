"""What people look at: explain (text), figures and the HTML report. Called by the CLI and API, never by a run's inner loop."""
