"""Statistics: EM rates with question-aware intervals and tests, declared once for every study."""
