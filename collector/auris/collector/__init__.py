"""The Auris collector: stores verdicts and answers queries."""
