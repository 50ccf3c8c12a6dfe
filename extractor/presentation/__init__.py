"""What people look at: `explain` (text), figures (`plots`), the HTML report, the notebook view, comparisons
drawn. Called by the CLI and the API, never by a run's inner loop. May import every layer below it."""
